//! Many member clusters in one process, for measuring the control plane at
//! fleet scale (`flotilla-executor simulate`, `scripts/bench-fleet`).
//!
//! Each simulated cluster is this crate's own code: heartbeats built by
//! [`Heartbeats`] on `<prefix>.telemetry.<cluster>`, its own durable
//! command consumer on `<prefix>.cmd.<cluster>.*` handled by
//! [`replicas::Replicas`], its own keys in KV `replicas` and its own
//! `replica.*` events. Only the data plane is simulated
//! ([`SimulatedBackend`]: ready a fixed delay after the start, nothing
//! runs), and clusters share a few NATS connections and the KV handles
//! instead of holding one each; a real member connects as its own NATS
//! user, which this process, with one user for all, does not model.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_kit::{Bus, BusConfig, KitError, RecordStore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backends::simulated::{SimulatedBackend, Tally};
use crate::declared::DeclaredGpus;
use crate::{Config, ExecutorError, Gpus, Heartbeats, SERVICE, replicas};

/// How a simulated fleet looks.
#[derive(Debug, Clone)]
pub struct SimulateConfig {
    pub bus: BusConfig,
    /// How many clusters, named `<name_prefix>-0000` on.
    pub clusters: usize,
    pub name_prefix: String,
    /// GPUs of each cluster.
    pub gpus: DeclaredGpus,
    /// How long after its start command a replica is ready.
    pub ready_after: Duration,
    pub heartbeat_interval: Duration,
    /// NATS connections the clusters are spread over.
    pub connections: usize,
    /// Commands each cluster handles at once.
    pub max_concurrent_starts: usize,
    /// Model cache folder the heartbeats report from (nothing is fetched).
    pub cache_dir: std::path::PathBuf,
}

/// Cluster `i`'s name.
pub fn cluster_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:04}")
}

/// Cluster `i`'s labels: `region` one of four, and `wave` 1, 2 or 3 for a
/// fifth, three tenths and a half of the fleet, so a staged rollout can
/// select 20 / 30 / 50 % of a deployment's clusters by label.
pub fn cluster_labels(i: usize) -> BTreeMap<String, String> {
    let wave = match i % 10 {
        0 | 1 => "1",
        2..=4 => "2",
        _ => "3",
    };
    BTreeMap::from([
        ("region".to_string(), format!("r{}", i % 4)),
        ("wave".to_string(), wave.to_string()),
    ])
}

type SimulatedReplicas = replicas::Replicas<SimulatedBackend>;

/// The running simulated clusters.
pub struct SimulatedFleet {
    clusters: Vec<Arc<SimulatedReplicas>>,
    tasks: JoinSet<()>,
}

impl SimulatedFleet {
    /// Connects, opens every cluster's consumer and starts its heartbeats;
    /// runs until `shutdown`.
    pub async fn start(
        config: SimulateConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, ExecutorError> {
        let mut buses = Vec::new();
        for _ in 0..config.connections.max(1) {
            buses.push(Bus::connect(&config.bus, SERVICE, &shutdown).await?);
        }
        flotilla_kit::provision(&buses[0]).await?;
        let cache = Arc::new(flotilla_model_store::ModelCache::open(
            &config.cache_dir,
            u64::MAX,
        )?);
        let mut shared = Vec::new();
        for bus in &buses {
            let store = crate::open_model_artifacts(bus).await?;
            let models = RecordStore::open(bus, &bus.topology.models.name).await?;
            models.start_watch(shutdown.clone()).await?;
            let records = RecordStore::open(bus, &bus.topology.replicas.name).await?;
            shared.push((store, models, records));
        }
        let mut tasks = JoinSet::new();
        let mut clusters = Vec::with_capacity(config.clusters);
        for i in 0..config.clusters {
            let which = i % buses.len();
            let bus = buses[which].clone();
            let (store, models, records) = shared[which].clone();
            let name = cluster_name(&config.name_prefix, i);
            let labels = cluster_labels(i);
            let region = labels.get("region").cloned().unwrap_or_default();
            let half = Arc::new(replicas::Replicas::over_stores(
                bus.clone(),
                name.clone(),
                region,
                SimulatedBackend::new(&name, config.ready_after),
                cache.clone(),
                store,
                models,
                records,
            ));
            let consumer = replicas::spawn(
                half.clone(),
                false,
                config.max_concurrent_starts,
                shutdown.clone(),
            )?;
            tasks.spawn(async move {
                let _ = consumer.await;
            });
            let heartbeats = Heartbeats::new(
                cluster_config(&config, &name, labels),
                Gpus::Declared,
                cache.clone(),
                half.holds.clone(),
            );
            // Spread over the interval, as independent clusters would be.
            let offset = config
                .heartbeat_interval
                .mul_f64(i as f64 / config.clusters as f64);
            tasks.spawn(send_heartbeats(
                bus,
                heartbeats,
                config.heartbeat_interval,
                offset,
                shutdown.clone(),
            ));
            clusters.push(half);
        }
        tracing::info!(
            clusters = config.clusters,
            connections = buses.len(),
            "simulated fleet running"
        );
        Ok(Self { clusters, tasks })
    }

    /// Starts and stops asked of every cluster, keyed `<cluster>/<replica>`.
    pub fn tally(&self) -> Tally {
        let mut all = Tally::default();
        for c in &self.clusters {
            let tally = c.backend.tally();
            for (id, n) in tally.starts {
                all.starts.insert(format!("{}/{id}", c.cluster), n);
            }
            for (id, n) in tally.stops {
                all.stops.insert(format!("{}/{id}", c.cluster), n);
            }
        }
        all
    }

    /// Replicas running in every cluster together.
    pub fn running(&self) -> usize {
        self.clusters.iter().map(|c| c.backend.running()).sum()
    }

    /// Waits until every cluster stopped (after `shutdown`).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

fn cluster_config(config: &SimulateConfig, name: &str, labels: BTreeMap<String, String>) -> Config {
    Config {
        bus: config.bus.clone(),
        cluster: name.to_string(),
        labels,
        taints: Vec::new(),
        declared: config.gpus.clone(),
        gpu_source: crate::GpuSource::Declared,
        cost_per_gpu_hour: 2.0,
        heartbeat_interval: config.heartbeat_interval,
        restart_grace: Duration::ZERO,
        http_addr: ([127, 0, 0, 1], 0).into(),
        edge_url: String::new(),
        replica_host: std::net::Ipv4Addr::LOCALHOST.into(),
        model_cache_dir: config.cache_dir.clone(),
        model_cache_budget_bytes: u64::MAX,
        runner_bin: std::path::PathBuf::new(),
        vllm_bin: None,
        backend: crate::BackendSettings::Local,
        max_concurrent_starts: config.max_concurrent_starts,
        // Simulated replicas serve nothing to drain.
        drain_timeout: Duration::ZERO,
    }
}

async fn send_heartbeats(
    bus: Bus,
    mut heartbeats: Heartbeats,
    interval: Duration,
    offset: Duration,
    shutdown: CancellationToken,
) {
    let subject = match bus.subjects.telemetry(&heartbeats.config.cluster) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{}", KitError::from(e));
            return;
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(offset) => {}
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let hb = heartbeats.next_heartbeat();
        let id = format!("{}-{}", hb.executor_instance, hb.sequence);
        if let Err(e) = bus.publish(subject.clone(), &hb, Some(&id)).await {
            tracing::warn!(cluster = %hb.cluster, "heartbeat not stored: {e}");
        }
    }
}
