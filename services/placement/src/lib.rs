//! The `placement` service: where each deployment's replicas go, and why.
//!
//! It is the only writer of KV `deployments` and `placements`. The
//! decisions are pure: [`spec::validate`] checks a document field by field,
//! [`scheduler::place`] maps (deployment, fleet, GPUs held by others,
//! current placement) to a placement with a reason for every cluster left
//! out. This module is the shell: it reads apply and delete requests, keeps
//! a watched copy of KV `clusters`, re-plans exactly the deployments a fleet
//! change affects, writes the results and publishes `deployment.*` events.
//!
//! Start reading at [`run`], then [`Planner::replan_for_fleet_change`].

pub mod autoscale;
pub mod fleet;
pub mod scheduler;
pub mod spec;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use flotilla_kit::consumer::run_consumer;
use flotilla_kit::{
    Bus, BusArgs, BusConfig, ConfigError, ConsumerSpec, Delivery, EventDraft, HandlerError, Health,
    KitError, RecordStore, now_unix_ms,
};
use flotilla_proto::v1::{
    self, ClusterRecord, ModelDeployment, PlacementDecision, PlacementOutcome, event::Payload,
};
use flotilla_proto::{ControlSubject, EventType, check_name};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::fleet::{Availability, ClusterView, Commitments, Fleet};
use crate::scheduler::{Settings, place, same_assignments};
use crate::spec::{DeploymentRequest, FieldError, Policy};

pub const SERVICE: &str = "placement";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-placement",
    version,
    about = "Flotilla placement: where each deployment's replicas go"
)]
pub struct Args {
    #[command(flatten)]
    pub bus: BusArgs,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:9102")]
    pub http_addr: SocketAddr,

    /// Score points a cluster a deployment already runs on keeps over
    /// challengers (0–100): replicas move only for a clearly better cluster.
    #[arg(long, env = "FLOTILLA_PLACEMENT_STICKINESS", default_value_t = 20.0)]
    pub stickiness: f64,

    /// A cluster back from unhealthy gets no new replicas for this long.
    #[arg(long, env = "FLOTILLA_FLAP_PROBATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub flap_probation: Duration,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_kit::logging::LogFormat::Text)]
    pub log_format: flotilla_kit::logging::LogFormat,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusConfig,
    pub http_addr: SocketAddr,
    pub settings: Settings,
    pub flap_probation_ms: i64,
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if !(0.0..=100.0).contains(&self.stickiness) {
            return Err(ConfigError::new("placement-stickiness", "must be 0 to 100"));
        }
        Ok(Config {
            bus: self.bus.validate()?,
            http_addr: self.http_addr,
            settings: Settings {
                stickiness: self.stickiness,
                ..Settings::default()
            },
            flap_probation_ms: i64::try_from(self.flap_probation.as_millis())
                .map_err(|_| ConfigError::new("flap-probation", "is too long"))?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error(transparent)]
    Kit(#[from] KitError),
}

/// What the planner is asked to do.
enum Request {
    Apply(
        Box<ModelDeployment>,
        String,
        oneshot::Sender<Result<(), HandlerError>>,
    ),
    Delete(String, String, oneshot::Sender<Result<(), HandlerError>>),
}

/// Owns every decision; one per service instance. Instances coordinate
/// through compare-and-set writes.
struct Planner {
    bus: Bus,
    clusters: RecordStore<ClusterRecord>,
    deployments: RecordStore<ModelDeployment>,
    placements: RecordStore<PlacementDecision>,
    settings: Settings,
    probation_ms: i64,
    /// The fleet as last planned against, to tell what changed.
    last_views: BTreeMap<String, ClusterView>,
    /// Autoscaled deployments' recent recommendations `(at, count)`.
    scale_history: BTreeMap<String, Vec<(i64, u32)>>,
}

/// How old a load summary may be and still count.
const LOAD_FRESH_MS: i64 = 5_000;

/// The replica count to place: the autoscaler's choice once it made one.
fn effective_replicas(doc: &ModelDeployment, request: &spec::DeploymentRequest) -> u32 {
    let desired = doc.status.as_ref().map_or(0, |s| s.desired_replicas);
    match &request.autoscaling {
        Some(a) if desired > 0 => a.clamp(desired),
        _ => request.replicas,
    }
}

/// Runs the service until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), PlacementError> {
    let bus = Bus::connect(&config.bus, SERVICE, &shutdown).await?;
    flotilla_kit::provision(&bus).await?;
    let health = Health::for_bus(&bus);
    health.serve(config.http_addr, shutdown.clone()).await?;

    let clusters = RecordStore::<ClusterRecord>::open(&bus, &bus.topology.clusters.name).await?;
    let deployments =
        RecordStore::<ModelDeployment>::open(&bus, &bus.topology.deployments.name).await?;
    let placements =
        RecordStore::<PlacementDecision>::open(&bus, &bus.topology.placements.name).await?;
    for store_watch in [
        clusters.start_watch(shutdown.clone()).await,
        deployments.start_watch(shutdown.clone()).await,
        placements.start_watch(shutdown.clone()).await,
    ] {
        store_watch?;
    }
    let mut planner = Planner {
        bus: bus.clone(),
        clusters,
        deployments,
        placements,
        settings: config.settings,
        probation_ms: config.flap_probation_ms,
        last_views: BTreeMap::new(),
        scale_history: BTreeMap::new(),
    };

    let (tx, rx) = mpsc::channel::<Request>(64);
    let apply = {
        let spec = ConsumerSpec::new(
            &bus.topology.control.name,
            "placement-apply",
            vec![bus.subjects.control(ControlSubject::DeploymentApply)],
        );
        let (tx, bus, stop) = (tx.clone(), bus.clone(), shutdown.clone());
        tokio::spawn(async move {
            let handler = move |d: Delivery<ModelDeployment>| {
                let tx = tx.clone();
                async move {
                    let (reply, answer) = oneshot::channel();
                    let id = d.msg_id.clone().unwrap_or_default();
                    tx.send(Request::Apply(Box::new(d.message), id, reply))
                        .await
                        .map_err(|_| HandlerError::retry("planner stopped"))?;
                    answer
                        .await
                        .map_err(|_| HandlerError::retry("planner stopped"))?
                }
            };
            run_consumer(&bus, spec, handler, stop).await
        })
    };
    let delete = {
        let spec = ConsumerSpec::new(
            &bus.topology.control.name,
            "placement-delete",
            vec![bus.subjects.control(ControlSubject::DeploymentDelete)],
        );
        let (tx, bus, stop) = (tx.clone(), bus.clone(), shutdown.clone());
        tokio::spawn(async move {
            let handler = move |d: Delivery<v1::DeleteDeployment>| {
                let tx = tx.clone();
                async move {
                    let (reply, answer) = oneshot::channel();
                    let id = if d.message.request_id.is_empty() {
                        d.msg_id.clone().unwrap_or_default()
                    } else {
                        d.message.request_id.clone()
                    };
                    tx.send(Request::Delete(d.message.name, id, reply))
                        .await
                        .map_err(|_| HandlerError::retry("planner stopped"))?;
                    answer
                        .await
                        .map_err(|_| HandlerError::retry("planner stopped"))?
                }
            };
            run_consumer(&bus, spec, handler, stop).await
        })
    };
    drop(tx);

    health.set_ready(true);
    tracing::info!("placement running");
    planner.run(rx, shutdown.clone()).await;
    for task in [apply, delete] {
        if let Ok(Err(e)) = task.await {
            tracing::error!("consumer failed: {e}");
        }
    }
    health.set_ready(false);
    if let Err(e) = bus.client.drain().await {
        tracing::warn!("draining the NATS connection: {e}");
    }
    Ok(())
}

/// A cluster view without the parts that change on every heartbeat, to
/// tell a change that matters to placement from one that does not.
fn relevant(view: &ClusterView) -> ClusterView {
    let mut v = view.clone();
    if let Availability::Probation { .. } = v.availability {
        v.availability = Availability::Probation { remaining_ms: 0 };
    }
    for g in &mut v.gpus {
        g.largest_free_bytes >>= 30;
    }
    v
}

impl Planner {
    async fn run(&mut self, mut requests: mpsc::Receiver<Request>, shutdown: CancellationToken) {
        let mut changes = self.clusters.changes();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Plan once for whatever changed while no instance was running.
        self.replan_for_fleet_change(true).await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                request = requests.recv() => match request {
                    Some(Request::Apply(doc, id, reply)) => {
                        let result = self.apply(*doc, &id).await;
                        let _ = reply.send(result);
                    }
                    Some(Request::Delete(name, id, reply)) => {
                        let result = self.delete(&name, &id).await;
                        let _ = reply.send(result);
                    }
                    None => break,
                },
                _ = changes.recv() => {
                    // Heartbeats rewrite records constantly: let a burst of
                    // changes settle, then compare the fleet once.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while !matches!(changes.try_recv(), Err(tokio::sync::broadcast::error::TryRecvError::Empty | tokio::sync::broadcast::error::TryRecvError::Closed)) {}
                    self.replan_for_fleet_change(false).await;
                }
                _ = tick.tick() => {
                    self.replan_for_fleet_change(false).await;
                    self.autoscale().await;
                }
            }
        }
    }

    fn fleet(&self) -> Fleet {
        let now = now_unix_ms();
        Fleet::new(
            self.clusters
                .cached_all()
                .iter()
                .map(|(_, r)| ClusterView::from_record(r, now, self.probation_ms))
                .collect(),
        )
    }

    /// The GPUs every placement holds; kept up to date by [`Self::plan`]
    /// across a batch of re-plans instead of being summed again for each.
    fn commitments(&self) -> Commitments {
        let mut held = Commitments::default();
        for (_, p) in self.placements.cached_all() {
            held.add(&p);
        }
        held
    }

    async fn reject(
        &self,
        name: &str,
        correlation: &str,
        error: &FieldError,
    ) -> Result<(), HandlerError> {
        tracing::info!(deployment = name, field = %error.field, "rejected: {}", error.reason);
        let detail = v1::ErrorDetail {
            code: "invalid_field".into(),
            field: error.field.clone(),
            reason: error.reason.clone(),
            subject: self.bus.subjects.control(ControlSubject::DeploymentApply),
            ..Default::default()
        };
        let draft = EventDraft::new(
            EventType::DeploymentRejected,
            name,
            format!("deployment {name} rejected: {error}"),
        )
        .payload(Payload::Error(detail))
        .correlation_id(correlation);
        self.bus
            .publish_event(draft)
            .await
            .map_err(HandlerError::retry)
    }

    /// Checks that need the fleet: named clusters exist, and some GPU type
    /// in the fleet could ever hold the model.
    fn validate_against_fleet(
        &self,
        request: &DeploymentRequest,
        fleet: &Fleet,
    ) -> Result<(), FieldError> {
        if let Policy::Fixed(names) = &request.policy {
            for (i, n) in names.iter().enumerate() {
                if fleet.index_of(n).is_none() {
                    return Err(FieldError {
                        field: format!("spec.placement.clusterNames[{i}]"),
                        reason: format!("no cluster named {n} is in the fleet"),
                    });
                }
            }
        }
        if fleet.is_empty() {
            return Ok(());
        }
        // Ask the scheduler about an idealised fleet: every cluster healthy,
        // uncordoned, untainted, unlabelled and empty. If even that places
        // nothing, no GPU type of this fleet can hold the model.
        let ideal = Fleet::new(
            fleet
                .clusters
                .iter()
                .map(|c| {
                    let mut c = c.clone();
                    c.availability = Availability::Available;
                    c.cordoned = None;
                    c.taints.clear();
                    for g in &mut c.gpus {
                        g.largest_free_bytes = g.memory_bytes;
                    }
                    c
                })
                .collect(),
        );
        let mut probe = request.clone();
        probe.required.clear();
        probe.policy = Policy::All;
        probe.replicas = 1;
        let decision = place(
            &probe,
            &ideal,
            &Commitments::default(),
            None,
            &self.settings,
        );
        if decision.assignments.is_empty() {
            let reasons: BTreeSet<String> = decision
                .exclusions
                .iter()
                .map(|e| decision.reason(e, &probe, &ideal))
                .collect();
            return Err(FieldError {
                field: "spec.resources.gpu".into(),
                reason: format!(
                    "no GPU type in the fleet can ever hold it: {}",
                    reasons.into_iter().collect::<Vec<_>>().join("; ")
                ),
            });
        }
        Ok(())
    }

    async fn apply(&mut self, doc: ModelDeployment, correlation: &str) -> Result<(), HandlerError> {
        let name = doc
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        if check_name("deployment", &name).is_err() {
            // No name to report under: the consumer loop's rejection event
            // names the subject instead.
            let e = spec::validate(&doc).err().unwrap_or(FieldError {
                field: "metadata.name".into(),
                reason: "is not a valid name".into(),
            });
            return Err(HandlerError::invalid(e.field, e.reason));
        }
        let mut request = match spec::validate(&doc) {
            Ok(r) => r,
            Err(e) => return self.reject(&name, correlation, &e).await,
        };
        let fleet = self.fleet();
        if let Err(e) = self.validate_against_fleet(&request, &fleet) {
            return self.reject(&name, correlation, &e).await;
        }

        let now = now_unix_ms();
        let written = self
            .deployments
            .update(&name, |current| {
                let same =
                    current.is_some_and(|c| c.spec == doc.spec && c.metadata == doc.metadata);
                if same {
                    return None;
                }
                let generation = current
                    .and_then(|c| c.status.as_ref())
                    .map_or(0, |s| s.generation)
                    + 1;
                let mut next = doc.clone();
                next.api_version = flotilla_proto::API_VERSION.into();
                next.kind = "ModelDeployment".into();
                let before = current.and_then(|c| c.status.clone()).unwrap_or_default();
                // An autoscaled count carries over a new spec, within its
                // new bounds.
                let desired = match &request.autoscaling {
                    Some(a) if before.desired_replicas > 0 => a.clamp(before.desired_replicas),
                    _ => 0,
                };
                next.status = Some(v1::ModelDeploymentStatus {
                    generation,
                    phase: v1::DeploymentPhase::Accepted.into(),
                    message: "accepted; placing".into(),
                    placement_generation: before.placement_generation,
                    updated_at_unix_ms: now,
                    desired_replicas: desired,
                    scaled_at_unix_ms: before.scaled_at_unix_ms,
                    scaling_reason: if desired > 0 {
                        before.scaling_reason
                    } else {
                        String::new()
                    },
                });
                Some(next)
            })
            .await
            .map_err(HandlerError::retry)?;
        let Some(stored) = written else {
            tracing::debug!(deployment = %name, "applied again unchanged");
            return Ok(());
        };
        let generation = stored.status.as_ref().map_or(0, |s| s.generation);
        request.replicas = effective_replicas(&stored, &request);
        let draft = EventDraft::new(
            EventType::DeploymentAccepted,
            &name,
            format!("deployment {name} accepted (generation {generation})"),
        )
        .generation(generation)
        .correlation_id(correlation)
        .id(format!("deployment-{name}-g{generation}-accepted"));
        self.bus
            .publish_event(draft)
            .await
            .map_err(HandlerError::retry)?;
        tracing::info!(deployment = %name, generation, "accepted");
        self.plan(
            &name,
            &request,
            &fleet,
            "apply",
            correlation,
            &mut self.commitments(),
        )
        .await
        .map_err(HandlerError::retry)
    }

    async fn delete(&mut self, name: &str, correlation: &str) -> Result<(), HandlerError> {
        check_name("deployment", name).map_err(|e| HandlerError::invalid("name", e.to_string()))?;
        let existed = self
            .deployments
            .get(name)
            .await
            .map_err(HandlerError::retry)?
            .is_some();
        if !existed {
            return Err(HandlerError::invalid(
                "name",
                format!("no deployment named {name:?}"),
            ));
        }
        self.placements
            .delete(name)
            .await
            .map_err(HandlerError::retry)?;
        self.deployments
            .delete(name)
            .await
            .map_err(HandlerError::retry)?;
        let draft = EventDraft::new(
            EventType::DeploymentDeleted,
            name,
            format!("deployment {name} deleted; its replicas are released"),
        )
        .correlation_id(correlation);
        self.bus
            .publish_event(draft)
            .await
            .map_err(HandlerError::retry)?;
        tracing::info!(deployment = %name, "deleted");
        // Freed capacity may let others place.
        self.replan_waiting(&self.fleet()).await;
        Ok(())
    }

    /// Places one deployment and records the result if it changed. `held`
    /// holds every placement's GPUs and still does afterwards, with this
    /// deployment's new placement in place of its old one.
    async fn plan(
        &self,
        name: &str,
        request: &DeploymentRequest,
        fleet: &Fleet,
        trigger: &str,
        correlation: &str,
        held: &mut Commitments,
    ) -> Result<(), KitError> {
        let current = self.placements.cached(name);
        if let Some(c) = &current {
            held.remove(c);
        }
        let result = self
            .plan_against(name, request, fleet, trigger, correlation, held, current)
            .await;
        if let Some(p) = self.placements.cached(name) {
            held.add(&p);
        }
        result
    }

    /// `held`: the GPUs of every other deployment.
    #[allow(clippy::too_many_arguments)]
    async fn plan_against(
        &self,
        name: &str,
        request: &DeploymentRequest,
        fleet: &Fleet,
        trigger: &str,
        correlation: &str,
        held: &Commitments,
        current: Option<PlacementDecision>,
    ) -> Result<(), KitError> {
        let spec_generation = self
            .deployments
            .cached(name)
            .and_then(|d| d.status)
            .map_or(0, |s| s.generation);
        let decision = place(request, fleet, held, current.as_ref(), &self.settings);
        let mut record = decision.to_record(request, fleet);
        record.deployment_generation = spec_generation;
        record.trigger = trigger.to_string();
        record.decided_at_unix_ms = now_unix_ms();

        let written = self
            .placements
            .update(name, |cur| {
                if let Some(c) = cur
                    && same_assignments(c, &record)
                    && c.deployment_generation == record.deployment_generation
                    && c.outcome == record.outcome
                {
                    return None;
                }
                let mut next = record.clone();
                next.generation = cur.map_or(0, |c| c.generation) + 1;
                Some(next)
            })
            .await?;
        let Some(written) = written else {
            return Ok(());
        };

        // Rebalanced: replicas that had a place got another. A deployment
        // that had none and now has one is placed.
        let moved = current
            .as_ref()
            .is_some_and(|c| !c.assignments.is_empty() && !same_assignments(c, &written));
        let ty = match written.outcome() {
            PlacementOutcome::Unschedulable => EventType::DeploymentUnschedulable,
            _ if moved && trigger != "apply" => EventType::DeploymentRebalanced,
            _ => EventType::DeploymentPlaced,
        };
        tracing::info!(deployment = name, generation = written.generation, %ty, trigger, "{}", written.message);
        let draft = EventDraft::new(ty, name, written.message.clone())
            .generation(written.generation)
            .correlation_id(correlation)
            .id(format!("placement-{name}-g{}", written.generation))
            .payload(Payload::Placement(written.clone()));
        self.bus.publish_event(draft).await?;

        let phase = match written.outcome() {
            PlacementOutcome::Unschedulable => v1::DeploymentPhase::Unschedulable,
            _ => v1::DeploymentPhase::Placed,
        };
        self.deployments
            .update(name, |cur| {
                let mut next = cur?.clone();
                let status = next.status.get_or_insert_with(Default::default);
                if status.placement_generation >= written.generation
                    && status.phase == i32::from(phase)
                {
                    return None;
                }
                status.phase = phase.into();
                status.message.clone_from(&written.message);
                status.placement_generation = written.generation;
                status.updated_at_unix_ms = now_unix_ms();
                Some(next)
            })
            .await?;
        Ok(())
    }

    /// Re-plans the deployments a fleet change affects: those with replicas
    /// on a changed cluster, and, when capacity may have grown, those not
    /// fully placed. `everything`: no record of the last fleet (start, or
    /// missed notifications), so compare against nothing.
    async fn replan_for_fleet_change(&mut self, everything: bool) {
        let fleet = self.fleet();
        let mut changed: BTreeSet<String> = BTreeSet::new();
        let mut more_room = everything;
        for view in &fleet.clusters {
            let now = relevant(view);
            match self.last_views.get(&view.name) {
                Some(before) if *before == now => {}
                before => {
                    changed.insert(view.name.clone());
                    more_room |= before.is_none_or(|b| {
                        (b.availability != Availability::Available
                            && now.availability == Availability::Available)
                            || (b.cordoned.is_some() && now.cordoned.is_none())
                            || b.gpus != now.gpus
                            || b.labels != now.labels
                            || b.taints != now.taints
                    });
                }
            }
        }
        for gone in self.last_views.keys() {
            if fleet.index_of(gone).is_none() {
                changed.insert(gone.clone());
            }
        }
        if !everything && changed.is_empty() {
            return;
        }
        self.last_views = fleet
            .clusters
            .iter()
            .map(|v| (v.name.clone(), relevant(v)))
            .collect();

        let mut affected: BTreeSet<String> = BTreeSet::new();
        for (name, p) in self.placements.cached_all() {
            let touches = p.assignments.iter().any(|a| changed.contains(&a.cluster));
            if touches || everything {
                affected.insert(name);
            }
        }
        if more_room {
            for (name, p) in self.placements.cached_all() {
                if p.outcome() != PlacementOutcome::Placed {
                    affected.insert(name);
                }
            }
        }
        for (name, d) in self.deployments.cached_all() {
            let planned = self.placements.cached(&name).is_some_and(|p| {
                Some(p.deployment_generation) == d.status.as_ref().map(|s| s.generation)
            });
            if !planned {
                affected.insert(name);
            }
        }
        if !changed.is_empty() {
            tracing::debug!(clusters = ?changed, deployments = affected.len(), "fleet changed");
        }
        self.replan(&affected, &fleet, "fleet-change").await;
    }

    async fn replan_waiting(&self, fleet: &Fleet) {
        let waiting: BTreeSet<String> = self
            .placements
            .cached_all()
            .into_iter()
            .filter(|(_, p)| p.outcome() != PlacementOutcome::Placed)
            .map(|(n, _)| n)
            .collect();
        self.replan(&waiting, fleet, "capacity-freed").await;
    }

    async fn replan(&self, names: &BTreeSet<String>, fleet: &Fleet, trigger: &str) {
        let mut held = self.commitments();
        for name in names {
            let Some(doc) = self.deployments.cached(name) else {
                continue;
            };
            let mut request = match spec::validate(&doc) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(deployment = %name, "stored deployment no longer valid: {e}");
                    continue;
                }
            };
            request.replicas = effective_replicas(&doc, &request);
            if let Err(e) = self
                .plan(name, &request, fleet, trigger, "", &mut held)
                .await
            {
                tracing::warn!(deployment = %name, "re-plan failed, will retry on the next change: {e}");
            }
        }
    }

    /// One autoscaling round: for each autoscaled deployment, the count its
    /// targets ask for from the fresh load summaries in KV `clusters`,
    /// stabilised; a change is written to its status, announced with the
    /// numbers and placed at once (rollout applies it without gates).
    async fn autoscale(&mut self) {
        let now = now_unix_ms();
        let usage: Vec<v1::ReplicaUsage> = self
            .clusters
            .cached_all()
            .into_iter()
            .filter(|(_, c)| c.health() != v1::ClusterHealth::Unhealthy)
            .flat_map(|(_, c)| c.replicas)
            .filter(|u| u.ready && now - u.sampled_at_unix_ms <= LOAD_FRESH_MS)
            .collect();
        let mut scaled = BTreeSet::new();
        for (name, doc) in self.deployments.cached_all() {
            let Ok(request) = spec::validate(&doc) else {
                continue;
            };
            let Some(a) = &request.autoscaling else {
                self.scale_history.remove(&name);
                continue;
            };
            let loads: Vec<autoscale::Load> = usage
                .iter()
                .filter(|u| u.deployment == name)
                .map(|u| autoscale::Load {
                    in_flight: u.in_flight,
                    queued: u.queued,
                    ttft_p95_ms: u.ttft_p95_ms,
                    tokens_per_second: u.tokens_per_second,
                })
                .collect();
            let Some((recommended, why)) = autoscale::recommend(a, &loads) else {
                continue;
            };
            let keep_ms = i64::try_from(a.up.window.max(a.down.window).as_millis())
                .unwrap_or(i64::MAX)
                .saturating_add(2_000);
            let history = self.scale_history.entry(name.clone()).or_default();
            history.push((now, recommended));
            // Keep one entry older than the window: it shows the window is
            // covered.
            while history.len() > 2 && history[1].0 < now.saturating_sub(keep_ms) {
                history.remove(0);
            }
            let current = effective_replicas(&doc, &request);
            let next = autoscale::stabilize(a, history, current, now);
            if next == current {
                continue;
            }
            let generation = doc.status.as_ref().map_or(0, |s| s.generation);
            let reason = format!(
                "{why}: {current} -> {next} (bounds {}..={})",
                a.min_replicas, a.max_replicas
            );
            let written = self
                .deployments
                .update(&name, |cur| {
                    let mut d = cur?.clone();
                    let status = d.status.get_or_insert_with(Default::default);
                    if status.generation != generation {
                        return None;
                    }
                    status.desired_replicas = next;
                    status.scaled_at_unix_ms = now;
                    status.scaling_reason = reason.clone();
                    Some(d)
                })
                .await;
            match written {
                Ok(Some(_)) => {}
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(deployment = %name, "autoscaling not recorded, will retry: {e}");
                    continue;
                }
            }
            // The next change waits for fresh recommendations over a whole
            // window: at most one step per window.
            history.retain(|(at, _)| *at == now);
            let draft = EventDraft::new(
                EventType::DeploymentScaled,
                &name,
                format!("{name} scaled from {current} to {next} replicas: {why}"),
            )
            .generation(generation)
            .id(format!("deployment-{name}-g{generation}-scaled-{now}"));
            if let Err(e) = self.bus.publish_event(draft).await {
                tracing::warn!(deployment = %name, "scaled event not sent: {e}");
            }
            tracing::info!(deployment = %name, from = current, to = next, "{why}");
            scaled.insert(name);
        }
        if !scaled.is_empty() {
            self.replan(&scaled, &self.fleet(), "autoscale").await;
        }
    }
}
