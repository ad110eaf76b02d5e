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
use futures::StreamExt;
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
    Apply(Box<Apply>),
    Delete(String, String, oneshot::Sender<Result<(), HandlerError>>),
    /// What an apply of this document would cause, with nothing stored.
    Preview(Box<ModelDeployment>, oneshot::Sender<v1::Event>),
}

/// One apply request and where its answer goes.
pub(crate) struct Apply {
    pub(crate) doc: ModelDeployment,
    pub(crate) correlation: String,
    /// The request's control stream sequence (0: unknown).
    pub(crate) sequence: u64,
    pub(crate) reply: oneshot::Sender<Result<(), HandlerError>>,
}

impl Apply {
    fn name(&self) -> &str {
        self.doc.metadata.as_ref().map_or("", |m| m.name.as_str())
    }

    fn answer(self, result: Result<(), HandlerError>) {
        let _ = self.reply.send(result);
    }
}

/// Applies handled as one batch at most: their checks and placements are
/// decided in turn, their writes and events sent together, so a queue of
/// applies costs a few round trips per batch rather than seven per apply.
pub(crate) const APPLY_BATCH: usize = 32;

/// Placement writes (with their events) in flight at once when a fleet
/// change re-plans many deployments.
const PERSIST_AT_ONCE: usize = 64;

/// One deployment's new placement, decided and not yet written.
struct Decision {
    name: String,
    record: PlacementDecision,
    current: Option<PlacementDecision>,
    trigger: String,
    span: tracing::Span,
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
                    Some(Request::Apply(first)) => {
                        // Whatever else is queued goes along, up to a
                        // delete: it must see the applies before it done.
                        let mut batch = vec![*first];
                        let mut after = None;
                        while batch.len() < APPLY_BATCH {
                            match requests.try_recv() {
                                Ok(Request::Apply(next)) => batch.push(*next),
                                // A preview sees the batch before it done.
                                Ok(other) => {
                                    after = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        self.apply_all(batch).await;
                        match after {
                            Some(Request::Delete(name, id, reply)) => {
                                let result = self.delete(&name, &id).await;
                                let _ = reply.send(result);
                            }
                            Some(Request::Preview(doc, reply)) => {
                                let _ = reply.send(self.preview(&doc));
                            }
                            Some(Request::Apply(_)) | None => {}
                        }
                    }
                    Some(Request::Delete(name, id, reply)) => {
                        let result = self.delete(&name, &id).await;
                        let _ = reply.send(result);
                    }
                    Some(Request::Preview(doc, reply)) => {
                        let _ = reply.send(self.preview(&doc));
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

    /// Applies in the order they came; a deployment named twice waits for
    /// the batch its first apply is in.
    async fn apply_all(&self, mut applies: Vec<Apply>) {
        while !applies.is_empty() {
            let mut seen = BTreeSet::new();
            let distinct = applies
                .iter()
                .position(|a| !seen.insert(a.name().to_string()))
                .unwrap_or(applies.len());
            let rest = applies.split_off(distinct);
            self.apply_distinct(applies).await;
            applies = rest;
        }
    }

    /// Applies of distinct deployments: checked and placed in turn (each
    /// placement counts the GPUs of those before it), written together.
    async fn apply_distinct(&self, applies: Vec<Apply>) {
        let fleet = self.fleet();
        let now = now_unix_ms();
        let mut valid = Vec::new();
        let mut rejected = Vec::new();
        for apply in applies {
            let name = apply.name().to_string();
            if check_name("deployment", &name).is_err() {
                // No name to report under: the consumer loop's rejection
                // event names the subject instead.
                let e = spec::validate(&apply.doc).err().unwrap_or(FieldError {
                    field: "metadata.name".into(),
                    reason: "is not a valid name".into(),
                });
                apply.answer(Err(HandlerError::invalid(e.field, e.reason)));
                continue;
            }
            let checked = spec::validate(&apply.doc).and_then(|request| {
                admit::validate_against_fleet(&request, &fleet, &self.settings)?;
                Ok(request)
            });
            match checked {
                Ok(request) => valid.push((apply, name, request)),
                Err(e) => rejected.push((apply, name, e)),
            }
        }
        let rejections =
            futures::future::join_all(rejected.into_iter().map(|(apply, name, e)| async move {
                let result = self.reject(&name, &apply.correlation, &e).await;
                apply.answer(result);
            }));
        let accepting = futures::future::join_all(
            valid
                .iter()
                .map(|(apply, name, request)| self.accept(name, apply, request, now)),
        );
        let (_, written) = tokio::join!(rejections, accepting);

        let mut held = self.commitments();
        let mut placing = Vec::new();
        for ((apply, name, mut request), written) in valid.into_iter().zip(written) {
            let stored = match written {
                Ok(Some(stored)) => stored,
                Ok(None) => {
                    tracing::debug!(deployment = %name, "applied again unchanged, or superseded");
                    apply.answer(Ok(()));
                    continue;
                }
                Err(e) => {
                    apply.answer(Err(HandlerError::retry(e)));
                    continue;
                }
            };
            let generation = stored.status.as_ref().map_or(0, |s| s.generation);
            request.replicas = effective_replicas(&stored, &request);
            let draft = EventDraft::new(
                EventType::DeploymentAccepted,
                &name,
                format!("deployment {name} accepted (generation {generation})"),
            )
            .generation(generation)
            .correlation_id(&apply.correlation)
            // The acceptance time tells a deployment applied again after a
            // delete from the one before, within the stream's dedup window.
            .id(format!(
                "deployment-{name}-g{generation}-accepted-{}",
                stored.status.as_ref().map_or(now, |s| s.updated_at_unix_ms)
            ));
            tracing::info!(deployment = %name, generation, "accepted");
            let decision = self.decide(&name, &request, &fleet, "apply", &mut held);
            placing.push((apply, draft, decision));
        }
        futures::future::join_all(
            placing
                .into_iter()
                .map(|(apply, draft, decision)| async move {
                    // The event is sent first, so it comes first in the stream; its
                    // acknowledgement is awaited beside the placing.
                    let (announced, planned) = tokio::join!(
                        self.bus.publish_event(draft),
                        self.persist(decision, &apply.correlation),
                    );
                    let result = announced
                        .map_err(HandlerError::retry)
                        .and_then(|()| planned.map_err(HandlerError::retry));
                    apply.answer(result);
                }),
        )
        .await;
    }

    /// The event an apply of `doc` would cause now: its rejection, or its
    /// placement against the fleet and every other placement. Nothing is
    /// written or published.
    pub(crate) fn preview(&self, doc: &ModelDeployment) -> v1::Event {
        let name = doc
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let fleet = self.fleet();
        let checked = spec::validate(doc).and_then(|request| {
            admit::validate_against_fleet(&request, &fleet, &self.settings)?;
            Ok(request)
        });
        let event = |ty: EventType, message: String, payload: Payload| v1::Event {
            time_unix_ms: now_unix_ms(),
            source: crate::SERVICE.into(),
            r#type: ty.to_string(),
            name: name.clone(),
            message,
            payload: Some(payload),
            ..Default::default()
        };
        let mut request = match checked {
            Ok(request) => request,
            Err(e) => {
                return event(
                    EventType::DeploymentRejected,
                    format!("deployment {name} would be rejected: {e}"),
                    Payload::Error(v1::ErrorDetail {
                        code: "invalid_field".into(),
                        field: e.field.clone(),
                        reason: e.reason.clone(),
                        subject: self.bus.subjects.preview_deployments(),
                        ..Default::default()
                    }),
                );
            }
        };
        if let Some(stored) = self.deployments.cached(&name) {
            request.replicas = effective_replicas(&stored, &request);
        }
        let mut held = self.commitments();
        let decision = self.decide(&name, &request, &fleet, "apply", &mut held);
        let record = decision.record;
        let ty = match record.outcome() {
            PlacementOutcome::Unschedulable => EventType::DeploymentUnschedulable,
            _ => EventType::DeploymentPlaced,
        };
        event(ty, record.message.clone(), Payload::Placement(record))
    }

    /// Writes an accepted spec with its next generation; `None` when the
    /// stored spec is the same, or came from a newer apply.
    async fn accept(
        &self,
        name: &str,
        apply: &Apply,
        request: &DeploymentRequest,
        now: i64,
    ) -> Result<Option<ModelDeployment>, flotilla_kit::KitError> {
        self.deployments
            .update(name, |current| {
                accepted_spec(current, &apply.doc, apply.sequence, request, now)
            })
            .await
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

    /// Places one deployment. `held` holds every placement's GPUs and
    /// still does afterwards, with this deployment's new placement in place
    /// of its old one.
    fn decide(
        &self,
        name: &str,
        request: &DeploymentRequest,
        fleet: &Fleet,
        trigger: &str,
        held: &mut Commitments,
    ) -> Decision {
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
        held.add(&record);
        Decision {
            name: name.to_string(),
            record,
            current,
            trigger: trigger.to_string(),
            span,
        }
    }

    /// Records a decision if it changed anything, announces it and the
    /// deployment's phase.
    async fn persist(&self, decision: Decision, correlation: &str) -> Result<(), PlanError> {
        let span = decision.span.clone();
        self.persist_in_span(decision, correlation)
            .instrument(span)
            .await
    }

    async fn persist_in_span(
        &self,
        decision: Decision,
        correlation: &str,
    ) -> Result<(), PlanError> {
        let Decision {
            name,
            record,
            current,
            trigger,
            ..
        } = decision;
        let name = name.as_str();
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
        let mut decisions = Vec::new();
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
            decisions.push(self.decide(name, &request, fleet, trigger, &mut held));
        }
        let mut writes = futures::stream::iter(decisions.into_iter().map(|decision| async move {
            let name = decision.name.clone();
            (name, self.persist(decision, "").await)
        }))
        .buffer_unordered(PERSIST_AT_ONCE);
        while let Some((name, result)) = writes.next().await {
            if let Err(e) = result {
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

/// The spec an apply stores: `doc` with its next generation, or `None`
/// when the stored spec is the same or came from a newer apply (`sequence`
/// 0: unknown, never older).
pub(crate) fn accepted_spec(
    current: Option<&ModelDeployment>,
    doc: &ModelDeployment,
    sequence: u64,
    request: &DeploymentRequest,
    now: i64,
) -> Option<ModelDeployment> {
    let before = current.and_then(|c| c.status.clone()).unwrap_or_default();
    if sequence != 0 && before.applied_sequence > sequence {
        return None;
    }
    let same = current.is_some_and(|c| c.spec == doc.spec && c.metadata == doc.metadata);
    if same {
        return None;
    }
    let mut next = doc.clone();
    next.api_version = flotilla_proto::API_VERSION.into();
    next.kind = "ModelDeployment".into();
    // An autoscaled count carries over a new spec, within its
    // new bounds.
    let desired = match &request.autoscaling {
        Some(a) if before.desired_replicas > 0 => a.clamp(before.desired_replicas),
        _ => 0,
    };
    next.status = Some(v1::ModelDeploymentStatus {
        generation: before.generation + 1,
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
        applied_sequence: if sequence == 0 {
            before.applied_sequence
        } else {
            sequence
        },
    });
    Some(next)
}
