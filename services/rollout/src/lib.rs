//! The `rollout` service: makes the replicas that exist match the newest
//! placement of every deployment, by sending start and stop commands to the
//! executors (`<prefix>.cmd.<cluster>.start|stop`).
//!
//! This first version rolls out by surge: a new generation's replicas start
//! first; the superseded ones stop once all the new ones are ready, or at
//! once when their cluster is gone (failover). The decisions are
//! [`plan::plan`], a pure function; commands carry fixed message ids, so the
//! repeated reconcile never sends one twice within the stream's dedup
//! window, and executors ignore starts of replicas they already run.
//!
//! Stages, approvals, `maxUnavailable`, halting and undo are not built yet.

pub mod plan;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use flotilla_kit::{Bus, BusArgs, BusConfig, ConfigError, Health, KitError, RecordStore};
use flotilla_proto::CommandAction;
use flotilla_proto::v1::{
    self, ClusterHealth, ClusterRecord, ModelDeployment, PlacementDecision, ReplicaStatus,
    executor_command::Action,
};
use tokio_util::sync::CancellationToken;

use crate::plan::Step;

pub const SERVICE: &str = "rollout";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-rollout",
    version,
    about = "Flotilla rollout: placements into executor commands"
)]
pub struct Args {
    #[command(flatten)]
    pub bus: BusArgs,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:9104")]
    pub http_addr: SocketAddr,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_kit::logging::LogFormat::Text)]
    pub log_format: flotilla_kit::logging::LogFormat,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusConfig,
    pub http_addr: SocketAddr,
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        Ok(Config {
            bus: self.bus.validate()?,
            http_addr: self.http_addr,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Kit(#[from] KitError),
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RolloutError> {
    let bus = Bus::connect(&config.bus, SERVICE, &shutdown).await?;
    flotilla_kit::provision(&bus).await?;
    let health = Health::for_bus(&bus);
    health.serve(config.http_addr, shutdown.clone()).await?;
    let placements =
        RecordStore::<PlacementDecision>::open(&bus, &bus.topology.placements.name).await?;
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, &bus.topology.replicas.name).await?;
    let clusters = RecordStore::<ClusterRecord>::open(&bus, &bus.topology.clusters.name).await?;
    let deployments =
        RecordStore::<ModelDeployment>::open(&bus, &bus.topology.deployments.name).await?;
    for store in [
        placements.start_watch(shutdown.clone()).await,
        replicas.start_watch(shutdown.clone()).await,
        clusters.start_watch(shutdown.clone()).await,
        deployments.start_watch(shutdown.clone()).await,
    ] {
        store?;
    }
    let mut placement_changes = placements.changes();
    let mut replica_changes = replicas.changes();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    health.set_ready(true);
    tracing::info!("rollout running");
    loop {
        reconcile(&bus, &placements, &replicas, &clusters, &deployments).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = placement_changes.recv() => {}
            _ = replica_changes.recv() => {}
            _ = tick.tick() => {}
        }
    }
    health.set_ready(false);
    let _ = bus.client.drain().await;
    Ok(())
}

async fn reconcile(
    bus: &Bus,
    placements: &RecordStore<PlacementDecision>,
    replicas: &RecordStore<ReplicaStatus>,
    clusters: &RecordStore<ClusterRecord>,
    deployments: &RecordStore<ModelDeployment>,
) {
    let live: BTreeSet<String> = clusters
        .cached_all()
        .into_iter()
        .filter(|(_, c)| matches!(c.health(), ClusterHealth::Healthy | ClusterHealth::Degraded))
        .map(|(n, _)| n)
        .collect();
    let all_replicas: Vec<ReplicaStatus> =
        replicas.cached_all().into_iter().map(|(_, r)| r).collect();
    let mut names: BTreeSet<String> = placements
        .cached_all()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.extend(all_replicas.iter().map(|r| r.deployment.clone()));
    for name in names {
        let mine: Vec<ReplicaStatus> = all_replicas
            .iter()
            .filter(|r| r.deployment == name)
            .cloned()
            .collect();
        let placement = placements
            .cached(&name)
            .unwrap_or_else(|| PlacementDecision {
                deployment: name.clone(),
                generation: mine.iter().map(|r| r.generation).max().unwrap_or(0) + 1,
                ..Default::default()
            });
        let model = deployments
            .cached(&name)
            .and_then(|d| d.spec)
            .and_then(|s| s.model);
        let model_name = model
            .as_ref()
            .map(|m| {
                m.artifact
                    .as_ref()
                    .map_or_else(|| m.preset.clone(), |a| a.name.clone())
            })
            .unwrap_or_default();
        let runtime = deployments
            .cached(&name)
            .and_then(|d| d.spec)
            .map_or(0, |s| s.runtime);
        for step in plan::plan(&placement, &mine, &live) {
            let (cluster, id, action, action_kind) = match step {
                Step::Start {
                    cluster,
                    replica_id,
                } => {
                    if model_name.is_empty() {
                        continue;
                    }
                    let action = Action::Start(v1::StartReplica {
                        replica_id: replica_id.clone(),
                        model: Some(v1::ModelRef {
                            name: model_name.clone(),
                            ..Default::default()
                        }),
                        runtime,
                        ..Default::default()
                    });
                    (cluster, replica_id, action, CommandAction::Start)
                }
                Step::Stop {
                    cluster,
                    replica_id,
                    reason,
                } => {
                    let action = Action::Stop(v1::StopReplica {
                        replica_id: replica_id.clone(),
                        reason,
                    });
                    (cluster, replica_id, action, CommandAction::Stop)
                }
            };
            let Ok(subject) = bus.subjects.command(&cluster, action_kind) else {
                continue;
            };
            let command_id = format!("{id}-{}", action_kind.as_str());
            let command = v1::ExecutorCommand {
                command_id: command_id.clone(),
                cluster: cluster.clone(),
                deployment: name.clone(),
                generation: placement.generation,
                action: Some(action),
            };
            match bus.publish(subject, &command, Some(&command_id)).await {
                Ok(()) => {
                    tracing::debug!(deployment = %name, %cluster, replica = %id, "{}", action_kind.as_str())
                }
                Err(e) => tracing::warn!(deployment = %name, "command not sent, will retry: {e}"),
            }
        }
    }
}
