//! The `executor`: one per cluster. This half reports the cluster to the
//! fleet: every `--heartbeat-interval` a `ClusterHeartbeat` on
//! `<prefix>.telemetry.<cluster>` with labels, taints, cost, CPU and memory,
//! and GPUs from NVML when a driver is present, from the cluster's nodes
//! on Kubernetes, or from the declared inventory otherwise (the source is
//! in the message, so a simulation is never mistaken for hardware). GPUs
//! held by this executor's replicas (or, on Kubernetes, by any pod) are
//! reported `allocated`, and each replica's usage carries its GPU count. The replica half ([`replicas`]) runs this
//! cluster's replicas through one [`backends::ReplicaBackend`]: local
//! processes (the default) or Kubernetes (`--backend kubernetes`).
//!
//! Start reading at [`run`]; GPU telemetry is in [`gpu`], the declared
//! inventory in [`declared`], the replica HTTP client in
//! [`replica_client`].

pub mod backends;
pub mod config;
pub mod declared;
pub mod gpu;
pub mod load;
pub mod logs;
pub mod models;
pub mod replica_client;
pub mod replicas;
pub mod simulate;

use std::time::Duration;

use flotilla_kit::{Bus, Health, KitError, now_unix_ms};
use flotilla_proto::v1::{self, ClusterInventory, InventorySource};
use tokio_util::sync::CancellationToken;

use crate::gpu::{DeviceReader, GpuTelemetry, NvmlReader};

pub const SERVICE: &str = "executor";

pub use config::{
    BackendKind, BackendSettings, Config, DEFAULT_RESTART_GRACE, DEFAULT_RUNNER_IMAGE,
    DEFAULT_VLLM_IMAGE, ExecutorArgs, GpuSource, check_edge_url, parse_size,
};

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("--gpu-source nvml: {0}")]
    Nvml(#[from] gpu::GpuError),
    #[error(transparent)]
    Cache(#[from] flotilla_model_store::FetchError),
    #[error("object store {bucket}: {source}")]
    ObjectStore {
        bucket: String,
        #[source]
        source: async_nats::jetstream::context::ObjectStoreError,
    },
    #[error("Kubernetes client: {0}")]
    Kubernetes(#[source] kube::Error),
}

/// Where this executor's GPU figures come from, decided once at start.
enum Gpus {
    Nvml(Box<dyn DeviceReader>, GpuTelemetry),
    Declared,
    /// The cluster's nodes (allocatable GPUs, feature discovery's labels)
    /// and the pods bound to them. Reported as `INVENTORY_SOURCE_NVML`:
    /// the figures are measured on the hardware (the device plugin and
    /// feature discovery read NVML on each node), not declared.
    Kubernetes(std::sync::Arc<backends::kubernetes::nodes::NodeInventory>),
}

fn choose_gpus(config: &Config, kube: Option<&kube::Client>) -> Result<Gpus, ExecutorError> {
    if let (GpuSource::Auto, Some(client)) = (config.gpu_source, kube) {
        // Declared GPUs (`--gpus`) stay an override.
        if config.declared.count() == 0 {
            tracing::info!("GPU inventory from the cluster's nodes");
            return Ok(Gpus::Kubernetes(std::sync::Arc::new(
                backends::kubernetes::nodes::NodeInventory::spawn(client.clone()),
            )));
        }
    }
    match config.gpu_source {
        GpuSource::Declared => Ok(Gpus::Declared),
        GpuSource::Nvml => Ok(Gpus::Nvml(
            Box::new(NvmlReader::open()?),
            GpuTelemetry::default(),
        )),
        GpuSource::Auto => match NvmlReader::open() {
            Ok(mut reader) => match reader.read_devices() {
                Ok(devices) if !devices.is_empty() => {
                    tracing::info!(gpus = devices.len(), "GPU inventory from NVML");
                    Ok(Gpus::Nvml(Box::new(reader), GpuTelemetry::default()))
                }
                _ => {
                    tracing::info!(
                        "NVML has no GPUs; using the declared inventory ({})",
                        config.declared
                    );
                    Ok(Gpus::Declared)
                }
            },
            Err(e) => {
                tracing::info!(
                    "no NVIDIA driver ({e}); using the declared inventory ({})",
                    config.declared
                );
                Ok(Gpus::Declared)
            }
        },
    }
}

/// Memory of this host in bytes, from /proc/meminfo where there is one.
fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Builds heartbeats; one per instance of the executor.
pub struct Heartbeats {
    config: Config,
    cache: std::sync::Arc<flotilla_model_store::ModelCache>,
    gpus: Gpus,
    holds: std::sync::Arc<load::GpuHolds>,
    instance: String,
    sequence: u64,
    cpu_cores: u32,
    memory_bytes: u64,
    gpu_read_failed: bool,
}

impl Heartbeats {
    fn new(
        config: Config,
        gpus: Gpus,
        cache: std::sync::Arc<flotilla_model_store::ModelCache>,
        holds: std::sync::Arc<load::GpuHolds>,
    ) -> Self {
        Self {
            config,
            cache,
            gpus,
            holds,
            instance: uuid::Uuid::new_v4().to_string(),
            sequence: 0,
            cpu_cores: std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
            memory_bytes: host_memory_bytes(),
            gpu_read_failed: false,
        }
    }

    pub fn next_heartbeat(&mut self) -> v1::ClusterHeartbeat {
        self.sequence += 1;
        let (gpus, source) = match &mut self.gpus {
            Gpus::Declared => {
                let mut gpus = self.config.declared.devices(&self.config.cluster);
                load::mark_allocated(&mut gpus, self.holds.total());
                (gpus, InventorySource::Declared)
            }
            // Pods hold GPUs there, this executor's replicas among them.
            Gpus::Kubernetes(nodes) => (nodes.devices().unwrap_or_default(), InventorySource::Nvml),
            Gpus::Nvml(reader, telemetry) => match telemetry.sample(reader.as_mut()) {
                Ok(mut gpus) => {
                    self.gpu_read_failed = false;
                    load::mark_allocated(&mut gpus, self.holds.total());
                    (gpus, InventorySource::Nvml)
                }
                Err(e) => {
                    if !self.gpu_read_failed {
                        tracing::error!("reading GPUs failed: {e}; reporting none until it works");
                    }
                    self.gpu_read_failed = true;
                    (Vec::new(), InventorySource::Nvml)
                }
            },
        };
        v1::ClusterHeartbeat {
            cluster: self.config.cluster.clone(),
            sequence: self.sequence,
            sent_at_unix_ms: now_unix_ms(),
            inventory: Some(ClusterInventory {
                labels: self.config.labels.clone(),
                taints: self.config.taints.clone(),
                gpus,
                cpu_cores: self.cpu_cores,
                memory_bytes: self.memory_bytes,
                cost_per_gpu_hour: self.config.cost_per_gpu_hour,
                edge_url: self.config.edge_url.clone(),
                cached_models: self
                    .cache
                    .cached()
                    .into_iter()
                    .map(|m| v1::CachedModel {
                        name: m.name,
                        digest: m.digest,
                        size_bytes: m.size_bytes,
                    })
                    .collect(),
                source: source.into(),
            }),
            replicas: Vec::new(),
            executor_version: env!("CARGO_PKG_VERSION").to_string(),
            executor_instance: self.instance.clone(),
            restart_grace_ms: 0,
        }
    }
}

/// How often the replicas' load is sampled for the autoscaler.
const LOAD_SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// How long a command the executor took stays claimed without a progress
/// ack (the kit sends one every third of it while the handler works).
pub(crate) const COMMAND_ACK_WAIT: Duration = Duration::from_secs(10);

/// What the replica half needs besides its backend.
struct ReplicaHalf {
    bus: Bus,
    cluster: String,
    region: String,
    cache: std::sync::Arc<flotilla_model_store::ModelCache>,
    store: async_nats::jetstream::object_store::ObjectStore,
    handover: bool,
    holds: std::sync::Arc<load::GpuHolds>,
    max_concurrent_starts: usize,
    drain: replicas::Drain,
}

impl ReplicaHalf {
    /// Opens the replica half over `backend` and starts it until `shutdown`.
    async fn start<B: backends::ReplicaBackend>(
        self,
        backend: B,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, ExecutorError> {
        let half = replicas::Replicas::open(
            self.bus,
            self.cluster,
            self.region,
            backend,
            self.cache,
            self.store,
            &shutdown,
        )
        .await?
        .with_holds(self.holds)
        .with_drain(self.drain);
        Ok(replicas::spawn(
            std::sync::Arc::new(half),
            self.handover,
            self.max_concurrent_starts,
            shutdown,
        )?)
    }
}

/// The object store of model artifacts the replicas' models come from.
async fn open_model_artifacts(
    bus: &Bus,
) -> Result<async_nats::jetstream::object_store::ObjectStore, ExecutorError> {
    let bucket = &bus.topology.model_artifacts.name;
    bus.jetstream
        .get_object_store(bucket)
        .await
        .map_err(|source| ExecutorError::ObjectStore {
            bucket: bucket.clone(),
            source,
        })
}

/// Runs the executor until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ExecutorError> {
    let kube = match &config.backend {
        BackendSettings::Kubernetes(_) => Some(
            kube::Client::try_default()
                .await
                .map_err(ExecutorError::Kubernetes)?,
        ),
        BackendSettings::Local => None,
    };
    let gpus = choose_gpus(&config, kube.as_ref())?;
    let bus = Bus::connect(&config.bus, SERVICE, &shutdown).await?;
    flotilla_kit::provision(&bus).await?;
    let health = Health::for_bus(&bus);
    health.serve(config.http_addr, shutdown.clone()).await?;
    let subject = bus
        .subjects
        .telemetry(&config.cluster)
        .map_err(KitError::from)?;
    let interval = config.heartbeat_interval;
    let cluster = config.cluster.clone();
    let cache = std::sync::Arc::new(flotilla_model_store::ModelCache::open(
        &config.model_cache_dir,
        config.model_cache_budget_bytes,
    )?);
    let store = open_model_artifacts(&bus).await?;
    let prefetch = models::spawn_prefetch(
        bus.clone(),
        cluster.clone(),
        store.clone(),
        cache.clone(),
        shutdown.clone(),
    )?;
    let region = config.labels.get("region").cloned().unwrap_or_default();
    let restart_grace = config.restart_grace;
    let handover = !restart_grace.is_zero();
    let holds = std::sync::Arc::new(load::GpuHolds::default());
    let half = ReplicaHalf {
        holds: holds.clone(),
        max_concurrent_starts: config.max_concurrent_starts,
        drain: replicas::Drain {
            timeout: config.drain_timeout,
            routing_grace: replicas::ROUTING_GRACE,
        },
        bus: bus.clone(),
        cluster: cluster.clone(),
        region,
        cache: cache.clone(),
        store,
        handover,
    };
    let (replica_task, log_source) = match &config.backend {
        BackendSettings::Local => {
            let owner = backends::local::LocalBackend::owner_for(&cluster, &config.model_cache_dir);
            let log_dir = logs::dir_for(&config.model_cache_dir);
            let backend = backends::local::LocalBackend::new(
                config.runner_bin.clone(),
                config.vllm_bin.clone(),
                owner,
            )
            .with_replica_host(config.replica_host)
            .with_log_dir(log_dir.clone());
            (
                half.start(backend, shutdown.clone()).await?,
                logs::LogSource::Local(log_dir),
            )
        }
        BackendSettings::Kubernetes(settings) => {
            let client = match kube.clone() {
                Some(client) => client,
                None => kube::Client::try_default()
                    .await
                    .map_err(ExecutorError::Kubernetes)?,
            };
            // Replicas are owned by --kube-owner (the executor's own
            // Deployment): read its uid once, at start.
            let settings = settings
                .clone()
                .with_owner(&client)
                .await
                .map_err(ExecutorError::Kubernetes)?;
            let source = logs::LogSource::Kubernetes {
                client: client.clone(),
                namespace: settings.namespace.clone(),
            };
            let mut backend = backends::kubernetes::KubernetesBackend::new(client, settings);
            if let Gpus::Kubernetes(inventory) = &gpus {
                backend = backend.with_inventory(inventory.clone());
            }
            (half.start(backend, shutdown.clone()).await?, source)
        }
    };
    let logs_task = tokio::spawn({
        let (bus, cluster, shutdown) = (bus.clone(), cluster.clone(), shutdown.clone());
        async move {
            if let Err(e) = logs::serve(bus, cluster, log_source, shutdown).await {
                tracing::warn!("replica logs will not be served: {e}");
            }
        }
    });
    let load = std::sync::Arc::new(load::LoadSampler::new(cluster.clone(), holds.clone()));
    let load_task = {
        let store = flotilla_kit::RecordStore::open(&bus, &bus.topology.replicas.name).await?;
        store.start_watch(shutdown.clone()).await?;
        tokio::spawn(
            load.clone()
                .run(store, LOAD_SAMPLE_INTERVAL, shutdown.clone()),
        )
    };
    let mut heartbeats = Heartbeats::new(config, gpus, cache, holds);

    health.set_ready(true);
    tracing::info!(%cluster, ?interval, "sending heartbeats on {subject}");
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let mut hb = heartbeats.next_heartbeat();
        hb.replicas = load.snapshot();
        let id = format!("{}-{}", hb.executor_instance, hb.sequence);
        match bus.publish(subject.clone(), &hb, Some(&id)).await {
            Ok(()) if failing => {
                tracing::info!("heartbeats are getting through again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!("heartbeat not stored: {e}; will keep trying");
                failing = true;
            }
            Err(_) => {}
        }
    }
    let _ = prefetch.await;
    let _ = replica_task.await;
    let _ = load_task.await;
    let _ = logs_task.await;
    if handover {
        // The last word: back within the grace, replicas left serving.
        let mut hb = heartbeats.next_heartbeat();
        hb.replicas = load.snapshot();
        hb.restart_grace_ms = u64::try_from(restart_grace.as_millis()).unwrap_or(u64::MAX);
        let id = format!("{}-{}", hb.executor_instance, hb.sequence);
        match bus.publish(subject.clone(), &hb, Some(&id)).await {
            Ok(()) => tracing::info!(
                grace = ?restart_grace,
                "announced a restart: the replicas keep serving until the next instance adopts them"
            ),
            Err(e) => tracing::warn!(
                "announcing the restart: {e}; the fleet will judge this silence as a failure"
            ),
        }
    }
    health.set_ready(false);
    if let Err(e) = bus.client.drain().await {
        tracing::warn!("draining the NATS connection: {e}");
    }
    Ok(())
}
