//! The planner: the shell around the pure decisions. One task owns it and
//! handles, one at a time, apply and delete requests, fleet changes and
//! the autoscaling tick; it reads the watched KV caches, asks the pure
//! functions what to do, writes the results by compare-and-set and
//! publishes `deployment.*` events.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_kit::{Bus, EventDraft, HandlerError, RecordStore, now_unix_ms};
use flotilla_proto::v1::{
    self, ClusterRecord, ModelDeployment, PlacementDecision, PlacementOutcome, event::Payload,
};
use flotilla_proto::{ControlSubject, EventType, check_name};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::affected::{affected, changed_clusters};
use crate::fleet::{ClusterView, Commitments, Fleet};
use crate::scheduler::{Settings, place, same_assignments};
use crate::spec::{self, DeploymentRequest, FieldError};
use crate::{PlanError, admit, autoscale};

/// What the planner is asked to do.
pub(crate) enum Request {
    Apply(
        Box<ModelDeployment>,
        String,
        oneshot::Sender<Result<(), HandlerError>>,
    ),
    Delete(String, String, oneshot::Sender<Result<(), HandlerError>>),
}

/// Owns every decision; one per service instance. Instances coordinate
/// through compare-and-set writes.
pub(crate) struct Planner {
    bus: Bus,
    clusters: RecordStore<ClusterRecord>,
    deployments: RecordStore<ModelDeployment>,
    placements: RecordStore<PlacementDecision>,
    settings: Settings,
    probation_ms: i64,
    /// The fleet as last planned against, to tell what changed.
    last_views: BTreeMap<String, ClusterView>,
    /// Cluster views, rebuilt only for records written since.
    views: std::sync::Mutex<crate::fleet::ViewCache>,
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

impl Planner {
    pub(crate) fn new(
        bus: Bus,
        stores: (
            RecordStore<ClusterRecord>,
            RecordStore<ModelDeployment>,
            RecordStore<PlacementDecision>,
        ),
        settings: Settings,
        probation_ms: i64,
    ) -> Self {
        let (clusters, deployments, placements) = stores;
        Self {
            bus,
            clusters,
            deployments,
            placements,
            settings,
            probation_ms,
            last_views: BTreeMap::new(),
            views: std::sync::Mutex::default(),
            scale_history: BTreeMap::new(),
        }
    }

    pub(crate) async fn run(
        &mut self,
        mut requests: mpsc::Receiver<Request>,
        shutdown: CancellationToken,
    ) {
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
        let mut views = flotilla_kit::sync::lock(&self.views);
        self.clusters
            .scan(|all| views.fleet(all, now, self.probation_ms))
    }

    /// The GPUs every placement holds; kept up to date by [`Self::plan`]
    /// across a batch of re-plans instead of being summed again for each.
    fn commitments(&self) -> Commitments {
        let mut held = Commitments::default();
        self.placements.scan(|all| {
            for (_, p) in all {
                held.add(p);
            }
        });
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
        if let Err(e) = admit::validate_against_fleet(&request, &fleet, &self.settings) {
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
        // The acceptance time tells a deployment applied again after a
        // delete from the one before, within the stream's dedup window.
        .id(format!(
            "deployment-{name}-g{generation}-accepted-{}",
            stored.status.as_ref().map_or(now, |s| s.updated_at_unix_ms)
        ));
        tracing::info!(deployment = %name, generation, "accepted");
        // The event is sent first, so it comes first in the stream; its
        // acknowledgement is awaited beside the placing.
        let mut held = self.commitments();
        let (announced, planned) = tokio::join!(
            self.bus.publish_event(draft),
            self.plan(&name, &request, &fleet, "apply", correlation, &mut held),
        );
        announced.map_err(HandlerError::retry)?;
        planned.map_err(HandlerError::retry)
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
    ) -> Result<(), PlanError> {
        let current = self.placements.cached(name);
        if let Some(c) = &current {
            held.remove(c);
        }
        let spec_generation = self
            .deployments
            .cached(name)
            .and_then(|d| d.status)
            .map_or(0, |s| s.generation);
        let span = tracing::info_span!(
            "replan",
            deployment = name,
            generation = spec_generation,
            trigger
        );
        let result = self
            .plan_against(
                name,
                request,
                fleet,
                trigger,
                correlation,
                spec_generation,
                held,
                current,
            )
            .instrument(span)
            .await;
        if let Some(p) = self.placements.cached(name) {
            held.add(&p);
        }
        result
    }

    /// `held`: the GPUs of every other deployment; `spec_generation`: the
    /// deployment document's generation this plan is for.
    #[allow(clippy::too_many_arguments)]
    async fn plan_against(
        &self,
        name: &str,
        request: &DeploymentRequest,
        fleet: &Fleet,
        trigger: &str,
        correlation: &str,
        spec_generation: u64,
        held: &Commitments,
        current: Option<PlacementDecision>,
    ) -> Result<(), PlanError> {
        let decision = place(
            request,
            fleet,
            held,
            current.as_ref(),
            &self.settings.for_trigger(trigger),
        );
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
            .await
            .map_err(|source| PlanError::Record {
                deployment: name.to_string(),
                source,
            })?;
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
        tracing::info!(placement_generation = written.generation, %ty, "{}", written.message);
        let draft = EventDraft::new(ty, name, written.message.clone())
            .generation(written.generation)
            .correlation_id(correlation)
            .id(format!(
                "placement-{name}-g{}-{}",
                written.generation, written.decided_at_unix_ms
            ))
            .payload(Payload::Placement(written.clone()));
        let phase = match written.outcome() {
            PlacementOutcome::Unschedulable => v1::DeploymentPhase::Unschedulable,
            _ => v1::DeploymentPhase::Placed,
        };
        // The event and the deployment's phase, each awaited beside the
        // other.
        let phase_written = self.deployments.update(name, |cur| {
            let mut next = cur?.clone();
            let status = next.status.get_or_insert_with(Default::default);
            if status.placement_generation >= written.generation && status.phase == i32::from(phase)
            {
                return None;
            }
            status.phase = phase.into();
            status.message.clone_from(&written.message);
            status.placement_generation = written.generation;
            status.updated_at_unix_ms = now_unix_ms();
            Some(next)
        });
        let (announced, phase_written) = tokio::join!(self.bus.publish_event(draft), phase_written);
        announced.map_err(|source| PlanError::Announce {
            deployment: name.to_string(),
            source,
        })?;
        phase_written.map_err(|source| PlanError::Phase {
            deployment: name.to_string(),
            source,
        })?;
        Ok(())
    }

    /// Re-plans the deployments a fleet change affects (see
    /// [`affected_by_fleet_change`]). `everything`: no record of the last
    /// fleet (start, or missed notifications), so compare against nothing.
    async fn replan_for_fleet_change(&mut self, everything: bool) {
        let fleet = self.fleet();
        // Placements and deployments are read only once a cluster changed:
        // heartbeats come from every cluster every second.
        let Some(clusters) =
            changed_clusters(&self.last_views, &fleet, &self.commitments(), everything)
        else {
            return;
        };
        let change = affected(
            clusters,
            &self.placements.cached_all(),
            &self.deployments.cached_all(),
            everything,
        );
        self.last_views = change.views;
        if !change.changed.is_empty() {
            tracing::debug!(clusters = ?change.changed, deployments = change.affected.len(), "fleet changed");
        }
        let span = tracing::info_span!("fleet_change", clusters = ?change.changed, everything);
        self.replan(&change.affected, &fleet, "fleet-change")
            .instrument(span)
            .await;
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
        // Runs every second: only autoscaled deployments are copied, and
        // the cluster records (every GPU, every replica) are scanned for
        // fresh load alone.
        let autoscaled: Vec<(String, ModelDeployment)> = self
            .deployments
            .select(|_, d| d.spec.as_ref().is_some_and(|s| s.autoscaling.is_some()));
        self.scale_history
            .retain(|name, _| autoscaled.iter().any(|(n, _)| n == name));
        if autoscaled.is_empty() {
            return;
        }
        let usage: Vec<v1::ReplicaUsage> = self.clusters.scan(|all| {
            all.filter(|(_, c)| c.health() != v1::ClusterHealth::Unhealthy)
                .flat_map(|(_, c)| c.replicas.iter())
                .filter(|u| u.ready && now - u.sampled_at_unix_ms <= LOAD_FRESH_MS)
                .cloned()
                .collect()
        });
        let mut scaled = BTreeSet::new();
        for (name, doc) in autoscaled {
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
