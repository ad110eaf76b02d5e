//! The `rollout` service: makes the replicas that exist match the newest
//! placement of every deployment, by sending start and stop commands to the
//! executors (`<prefix>.cmd.<cluster>.start|stop`).
//!
//! Replicas belong to a *template* (the spec's model, runtime and
//! resources). A placement that only moves or adds replicas keeps every
//! replica it still wants; a new template is rolled out by the spec's
//! strategy: RollingUpdate (`maxSurge`, default 25 % rounded up;
//! `maxUnavailable`, default 0) or Staged (stages of clusters chosen by
//! labels, each rolled with the same limits, then a wait and/or an
//! approval; clusters no stage selects form a last stage, `rest`). Lost
//! capacity is replaced at once on any cluster, gates or not. A first
//! rollout (nothing running to protect) and an undo skip the gates.
//!
//! Progress lives in KV `rollouts` (compare-and-set), so a restarted
//! instance continues where the last one stopped; commands and events have
//! ids fixed by that state, so nothing is sent twice within the streams'
//! dedup windows, and executors ignore a start of a replica they run.
//! Failures of the new template's replicas are counted once each; at
//! `--halt-after-failures` the rollout halts: it stops starting and
//! retrying, and keeps the old replicas. `rollout undo` re-applies the spec
//! the rollout replaced.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use flotilla_kit::consumer::run_consumer;
use flotilla_kit::{
    Bus, BusArgs, BusConfig, ConfigError, ConsumerSpec, Delivery, EventDraft, HandlerError, Health,
    KitError, RecordStore, now_unix_ms,
};
use flotilla_proto::v1::{
    self, ClusterHealth, ClusterRecord, ModelDeployment, ModelDeploymentSpec, PlacementDecision,
    PlacementOutcome, ReplicaPhase, ReplicaStatus, RolloutPhase, RolloutState, StagePhase,
    StageStatus, event::Payload, executor_command::Action,
};
use flotilla_proto::{CommandAction, ControlSubject, EventType};
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::plan::{Inputs, Limits, Step};

pub const SERVICE: &str = "rollout";
const APPROVE_CONSUMER: &str = "rollout-approve";
const UNDO_CONSUMER: &str = "rollout-undo";
/// The implicit last stage of a Staged rollout.
pub const REST_STAGE: &str = "rest";

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

    /// Failures of a new template's replicas (each failed start counted
    /// once) that halt its rollout.
    #[arg(long, env = "FLOTILLA_HALT_AFTER_FAILURES", default_value_t = 3)]
    pub halt_after_failures: u32,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_kit::logging::LogFormat::Text)]
    pub log_format: flotilla_kit::logging::LogFormat,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusConfig,
    pub http_addr: SocketAddr,
    pub halt_after_failures: u32,
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if self.halt_after_failures == 0 {
            return Err(ConfigError::new(
                "--halt-after-failures",
                "must be at least 1",
            ));
        }
        Ok(Config {
            bus: self.bus.validate()?,
            http_addr: self.http_addr,
            halt_after_failures: self.halt_after_failures,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Kit(#[from] KitError),
}

#[derive(Clone)]
struct Rollouts {
    bus: Bus,
    placements: RecordStore<PlacementDecision>,
    replicas: RecordStore<ReplicaStatus>,
    clusters: RecordStore<ClusterRecord>,
    deployments: RecordStore<ModelDeployment>,
    rollouts: RecordStore<RolloutState>,
    halt_after_failures: u32,
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RolloutError> {
    let bus = Bus::connect(&config.bus, SERVICE, &shutdown).await?;
    flotilla_kit::provision(&bus).await?;
    let health = Health::for_bus(&bus);
    health.serve(config.http_addr, shutdown.clone()).await?;
    let t = &bus.topology;
    let r = Rollouts {
        placements: RecordStore::open(&bus, &t.placements.name).await?,
        replicas: RecordStore::open(&bus, &t.replicas.name).await?,
        clusters: RecordStore::open(&bus, &t.clusters.name).await?,
        deployments: RecordStore::open(&bus, &t.deployments.name).await?,
        rollouts: RecordStore::open(&bus, &t.rollouts.name).await?,
        halt_after_failures: config.halt_after_failures,
        bus: bus.clone(),
    };
    r.placements.start_watch(shutdown.clone()).await?;
    r.replicas.start_watch(shutdown.clone()).await?;
    r.clusters.start_watch(shutdown.clone()).await?;
    r.deployments.start_watch(shutdown.clone()).await?;
    r.rollouts.start_watch(shutdown.clone()).await?;

    let approve = r.spawn_control(
        APPROVE_CONSUMER,
        ControlSubject::RolloutApprove,
        shutdown.clone(),
        |r, d: Delivery<v1::ApproveRollout>| async move { r.on_approve(d).await },
    );
    let undo = r.spawn_control(
        UNDO_CONSUMER,
        ControlSubject::RolloutUndo,
        shutdown.clone(),
        |r, d: Delivery<v1::UndoRollout>| async move { r.on_undo(d).await },
    );

    let mut placement_changes = r.placements.changes();
    let mut replica_changes = r.replicas.changes();
    let mut rollout_changes = r.rollouts.changes();
    let mut cluster_changes = r.clusters.changes();
    // Waits between stages end on this tick.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    health.set_ready(true);
    tracing::info!(
        halt_after_failures = config.halt_after_failures,
        "rollout running"
    );
    loop {
        r.reconcile().await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = placement_changes.recv() => {}
            _ = replica_changes.recv() => {}
            _ = rollout_changes.recv() => {}
            _ = cluster_changes.recv() => {}
            _ = tick.tick() => {}
        }
    }
    health.set_ready(false);
    for task in [approve, undo] {
        match task.await {
            Ok(Err(e)) => tracing::error!("consumer failed: {e}"),
            Err(e) => tracing::error!("consumer panicked: {e}"),
            Ok(Ok(())) => {}
        }
    }
    let _ = bus.client.drain().await;
    Ok(())
}

/// The replica template of a spec: what a replica runs. Placement-only
/// fields (clusters, tolerations, rollout strategy) are not part of it.
pub fn template_of_spec(spec: &ModelDeploymentSpec) -> String {
    let model = spec.model.as_ref().map(Message::encode_to_vec);
    let resources = spec.resources.as_ref().map(Message::encode_to_vec);
    plan::template_digest(&[
        model.as_deref().unwrap_or_default(),
        &spec.runtime.to_le_bytes(),
        resources.as_deref().unwrap_or_default(),
    ])
}

/// One stage with the clusters it holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePlan {
    pub name: String,
    pub clusters: BTreeSet<String>,
    pub wait: Duration,
    pub approval: bool,
}

/// The stages of a Staged spec over the known clusters: each cluster in
/// the first stage that selects it, the rest in a last stage `rest`.
pub fn resolve_stages(
    spec: &v1::RolloutSpec,
    clusters: &[(String, BTreeMap<String, String>)],
) -> Vec<StagePlan> {
    let mut taken: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    for (i, stage) in spec.stages.iter().enumerate() {
        let field = format!("spec.rollout.stages[{i}]");
        let selector = stage.cluster_selector.clone().unwrap_or_default();
        // Placement validated the spec; a selector it let through that
        // does not read selects nothing rather than everything.
        let requirements = flotilla_placement::spec::check_label_selector(
            &format!("{field}.clusterSelector"),
            &selector,
        )
        .ok();
        let chosen: BTreeSet<String> = clusters
            .iter()
            .filter(|(name, labels)| {
                !taken.contains(name)
                    && requirements
                        .as_ref()
                        .is_some_and(|reqs| reqs.iter().all(|r| r.matches(labels)))
            })
            .map(|(name, _)| name.clone())
            .collect();
        taken.extend(chosen.iter().cloned());
        let gate = stage.after_stage.clone().unwrap_or_default();
        out.push(StagePlan {
            name: stage.name.clone(),
            clusters: chosen,
            wait: flotilla_placement::spec::parse_duration(
                &format!("{field}.afterStage.wait"),
                &gate.wait,
            )
            .ok()
            .flatten()
            .unwrap_or_default(),
            approval: gate.approval,
        });
    }
    out.push(StagePlan {
        name: REST_STAGE.into(),
        clusters: clusters
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| !taken.contains(n))
            .collect(),
        wait: Duration::ZERO,
        approval: false,
    });
    out
}

fn limits(spec: &ModelDeploymentSpec, desired: u32) -> Limits {
    let rollout = spec.rollout.clone().unwrap_or_default();
    let surge = flotilla_placement::spec::resolve_int_or_percent(
        "spec.rollout.maxSurge",
        &rollout.max_surge,
        desired,
        true,
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| desired.div_ceil(4));
    let unavailable = flotilla_placement::spec::resolve_int_or_percent(
        "spec.rollout.maxUnavailable",
        &rollout.max_unavailable,
        desired,
        false,
    )
    .ok()
    .flatten()
    .unwrap_or(0);
    Limits::new(surge, unavailable)
}

fn alive_on(r: &ReplicaStatus, live: &BTreeSet<String>) -> bool {
    live.contains(&r.cluster)
        && !matches!(
            r.phase(),
            ReplicaPhase::Failed | ReplicaPhase::Stopping | ReplicaPhase::Stopped
        )
}

impl Rollouts {
    /// Runs `handle` for every request on one control subject.
    fn spawn_control<M, Fut>(
        &self,
        durable: &'static str,
        which: ControlSubject,
        shutdown: CancellationToken,
        handle: fn(Rollouts, Delivery<M>) -> Fut,
    ) -> tokio::task::JoinHandle<Result<(), KitError>>
    where
        M: flotilla_proto::Contract,
        Fut: std::future::Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let spec = ConsumerSpec::new(
            &self.bus.topology.control.name,
            durable,
            vec![self.bus.subjects.control(which)],
        );
        let r = self.clone();
        tokio::spawn(async move {
            let bus = r.bus.clone();
            let handler = move |d: Delivery<M>| handle(r.clone(), d);
            run_consumer(&bus, spec, handler, shutdown).await
        })
    }

    async fn reconcile(&self) {
        let live: BTreeSet<String> = self
            .clusters
            .cached_all()
            .into_iter()
            .filter(|(_, c)| matches!(c.health(), ClusterHealth::Healthy | ClusterHealth::Degraded))
            .map(|(n, _)| n)
            .collect();
        let labels: Vec<(String, BTreeMap<String, String>)> = self
            .clusters
            .cached_all()
            .into_iter()
            .map(|(n, c)| {
                let labels = c
                    .inventory
                    .map(|i| i.labels.into_iter().collect())
                    .unwrap_or_default();
                (n, labels)
            })
            .collect();
        let all_replicas: Vec<ReplicaStatus> = self
            .replicas
            .cached_all()
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        let mut names: BTreeSet<String> = self
            .placements
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
            if let Err(e) = self.reconcile_one(&name, &mine, &live, &labels).await {
                tracing::warn!(deployment = %name, "rollout step failed, will retry: {e}");
            }
        }
    }

    async fn reconcile_one(
        &self,
        name: &str,
        mine: &[ReplicaStatus],
        live: &BTreeSet<String>,
        labels: &[(String, BTreeMap<String, String>)],
    ) -> Result<(), KitError> {
        let deployment = self.deployments.cached(name);
        let spec = deployment.as_ref().and_then(|d| d.spec.clone());
        let spec_generation = deployment
            .as_ref()
            .and_then(|d| d.status.as_ref())
            .map_or(0, |s| s.generation);
        let Some(spec) = spec else {
            // Deleted: every replica goes.
            let generation = mine.iter().map(|r| r.generation).max().unwrap_or(0) + 1;
            let placement = PlacementDecision {
                deployment: name.to_string(),
                generation,
                ..Default::default()
            };
            let plan = plan::plan(&Inputs {
                deployment: name,
                template: "",
                placement: &placement,
                replicas: mine,
                live,
                limits: Limits::new(0, u32::MAX),
                active: None,
                halted: false,
            });
            return self.send(name, &placement, None, plan.steps).await;
        };
        let Some(placement) = self.placements.cached(name) else {
            return Ok(());
        };
        // Placement has not decided for this spec yet, or found no room:
        // keep what runs.
        if placement.deployment_generation != spec_generation
            || placement.outcome() == PlacementOutcome::Unschedulable
        {
            return Ok(());
        }
        let template = template_of_spec(&spec);
        let stored = self.rollouts.cached(name);
        let before = stored.clone().unwrap_or_default();
        let mut state = before.clone();
        let mut events: Vec<EventDraft> = Vec::new();
        let now = now_unix_ms();

        if state.template != template {
            let others_alive = mine.iter().any(|r| {
                plan::template_of(&r.replica_id) != Some(template.as_str()) && alive_on(r, live)
            });
            state = RolloutState {
                deployment: name.to_string(),
                target_generation: placement.generation,
                previous_generation: before.completed_generation,
                phase: RolloutPhase::Progressing.into(),
                template: template.clone(),
                deployment_generation: spec_generation,
                completed_spec: before.completed_spec.clone(),
                completed_generation: before.completed_generation,
                previous_spec: before.completed_spec.clone(),
                skip_gates: !others_alive || before.undo_requested,
                message: if before.undo_requested {
                    format!("undo: rolling back to the spec of generation {spec_generation}")
                } else {
                    format!("rolling out spec generation {spec_generation}")
                },
                ..Default::default()
            };
        }
        let id_base = format!(
            "rollout-{name}-{}-g{}",
            state.template, state.deployment_generation
        );
        let event_id = |what: &str| format!("{id_base}-{what}");
        if stored.as_ref().is_none_or(|s| s.template != template) {
            events.push(
                EventDraft::new(EventType::RolloutStarted, name, state.message.clone())
                    .id(event_id("started")),
            );
        }
        state.target_generation = placement.generation;

        let staged = spec
            .rollout
            .as_ref()
            .is_some_and(|r| r.strategy() == v1::RolloutStrategy::Staged)
            && !state.skip_gates;
        let stages = if staged {
            resolve_stages(
                spec.rollout.as_ref().unwrap_or(&v1::RolloutSpec::default()),
                labels,
            )
        } else {
            vec![StagePlan {
                name: "all".into(),
                clusters: labels.iter().map(|(n, _)| n.clone()).collect(),
                wait: Duration::ZERO,
                approval: false,
            }]
        };
        if state.stages.len() != stages.len()
            || state
                .stages
                .iter()
                .zip(&stages)
                .any(|(s, p)| s.name != p.name)
        {
            state.stages = stages
                .iter()
                .map(|p| StageStatus {
                    name: p.name.clone(),
                    phase: StagePhase::Pending.into(),
                    ..Default::default()
                })
                .collect();
            state.current_stage = 0;
        }
        for (status, p) in state.stages.iter_mut().zip(&stages) {
            status.clusters = p.clusters.iter().cloned().collect();
        }
        let desired: u32 = placement.assignments.iter().map(|a| a.replicas).sum();
        let limits = limits(&spec, desired);

        let steps = loop {
            let current = (state.current_stage as usize).min(stages.len() - 1);
            let complete = state.phase() == RolloutPhase::Complete;
            let active: Option<BTreeSet<String>> = (staged && !complete).then(|| {
                stages[..=current]
                    .iter()
                    .flat_map(|s| s.clusters.iter().cloned())
                    .collect()
            });
            let halted = state.phase() == RolloutPhase::Halted;
            let plan = plan::plan(&Inputs {
                deployment: name,
                template: &template,
                placement: &placement,
                replicas: mine,
                live,
                limits,
                active: active.as_ref(),
                halted,
            });
            for f in &plan.failures {
                if !complete && !state.failures.contains(f) {
                    state.failures.push(f.clone());
                }
            }
            state.failed_replicas = state.failures.len() as u32;
            if halted || complete {
                break plan.steps;
            }
            if state.failed_replicas >= self.halt_after_failures {
                state.phase = RolloutPhase::Halted.into();
                state.message = format!(
                    "halted: {} replica failures (threshold {}); the previous replicas keep serving; `flotilla rollout undo {name}` returns to the previous spec",
                    state.failed_replicas, self.halt_after_failures
                );
                if let Some(stage) = state.stages.get_mut(current) {
                    stage.phase = StagePhase::Failed.into();
                }
                events.push(
                    EventDraft::new(EventType::RolloutHalted, name, state.message.clone())
                        .id(event_id("halted")),
                );
                continue;
            }
            if !plan.active_done {
                state.phase = RolloutPhase::Progressing.into();
                state.message = format!(
                    "stage {}: {}/{} replicas of spec generation {} ready",
                    stages[current].name, plan.ready, plan.desired, state.deployment_generation
                );
                if let Some(stage) = state.stages.get_mut(current)
                    && stage.phase() != StagePhase::Progressing
                {
                    let first = stage.phase() == StagePhase::Pending;
                    stage.phase = StagePhase::Progressing.into();
                    if first {
                        stage.started_at_unix_ms = now;
                        if staged && !stage.clusters.is_empty() {
                            events.push(
                                EventDraft::new(
                                    EventType::RolloutStageStarted,
                                    name,
                                    format!("stage {} started", stage.name),
                                )
                                .id(event_id(&format!("stage-{current}-started"))),
                            );
                        }
                    }
                }
                break plan.steps;
            }
            let last = current + 1 >= stages.len();
            if staged
                && let Some(stage) = state.stages.get_mut(current)
                && stage.phase() != StagePhase::Complete
            {
                stage.phase = StagePhase::Complete.into();
                stage.completed_at_unix_ms = now;
                if stage.started_at_unix_ms == 0 {
                    stage.started_at_unix_ms = now;
                }
                let message = format!(
                    "stage {} complete: clusters {}",
                    stage.name,
                    stage.clusters.join(", ")
                );
                // The implicit last stage is news only when it holds clusters.
                if !stage.clusters.is_empty() {
                    events.push(
                        EventDraft::new(EventType::RolloutStageCompleted, name, message)
                            .id(event_id(&format!("stage-{current}-completed"))),
                    );
                }
            }
            if last {
                state.phase = RolloutPhase::Complete.into();
                state.message = format!(
                    "spec generation {} rolled out: {} replicas ready",
                    state.deployment_generation, plan.ready
                );
                for stage in &mut state.stages {
                    stage.phase = StagePhase::Complete.into();
                }
                state.completed_spec = Some(spec.clone());
                state.completed_generation = state.deployment_generation;
                events.push(
                    EventDraft::new(EventType::RolloutCompleted, name, state.message.clone())
                        .id(event_id("completed")),
                );
                continue;
            }
            let gate = &stages[current];
            let stage = &state.stages[current];
            let wait_until = stage.completed_at_unix_ms + gate.wait.as_millis() as i64;
            if now < wait_until {
                state.phase = RolloutPhase::Waiting.into();
                state.message = format!(
                    "stage {} complete; next stage in {} s",
                    gate.name,
                    (wait_until - now + 999) / 1000
                );
                break plan.steps;
            }
            if gate.approval && !stage.approved {
                if state.phase() != RolloutPhase::AwaitingApproval {
                    state.phase = RolloutPhase::AwaitingApproval.into();
                    state.message = format!(
                        "stage {} complete; `flotilla rollout approve {name}` starts stage {}",
                        gate.name,
                        stages[current + 1].name
                    );
                    events.push(
                        EventDraft::new(
                            EventType::RolloutAwaitingApproval,
                            name,
                            state.message.clone(),
                        )
                        .id(event_id(&format!("stage-{current}-awaiting-approval"))),
                    );
                }
                break plan.steps;
            }
            state.current_stage = (current + 1) as u32;
        };

        if stored.as_ref() != Some(&state) {
            state.updated_at_unix_ms = now;
            for draft in events {
                let draft = draft
                    .generation(state.deployment_generation)
                    .payload(Payload::Rollout(state.clone()));
                self.bus.publish_event(draft).await?;
            }
            let expected = stored.clone();
            let next = state.clone();
            let written = self
                .rollouts
                .update(name, |cur| (cur.cloned() == expected).then(|| next.clone()))
                .await?;
            if written.is_none() {
                // Another instance moved it first; the next round starts
                // from what it wrote.
                return Ok(());
            }
        }
        self.send(name, &placement, Some(&spec), steps).await
    }

    async fn send(
        &self,
        name: &str,
        placement: &PlacementDecision,
        spec: Option<&ModelDeploymentSpec>,
        steps: Vec<Step>,
    ) -> Result<(), KitError> {
        for step in steps {
            let (cluster, replica_id, command_id, action, kind) = match step {
                Step::Start {
                    cluster,
                    replica_id,
                    command_id,
                } => {
                    let Some(spec) = spec else { continue };
                    let Some(model) = spec.model.as_ref() else {
                        continue;
                    };
                    let (model_name, digest) = match &model.artifact {
                        Some(a) => (a.name.clone(), a.digest.clone()),
                        None => (model.preset.clone(), String::new()),
                    };
                    let placement_spec = spec.placement.clone().unwrap_or_default();
                    let action = Action::Start(v1::StartReplica {
                        replica_id: replica_id.clone(),
                        model: Some(v1::ModelRef {
                            name: model_name,
                            digest,
                            ..Default::default()
                        }),
                        runtime: spec.runtime,
                        gpu: spec.resources.as_ref().and_then(|r| r.gpu.clone()),
                        tolerations: placement_spec.tolerations,
                        ..Default::default()
                    });
                    (
                        cluster,
                        replica_id,
                        command_id,
                        action,
                        CommandAction::Start,
                    )
                }
                Step::Stop {
                    cluster,
                    replica_id,
                    command_id,
                    reason,
                } => {
                    let action = Action::Stop(v1::StopReplica {
                        replica_id: replica_id.clone(),
                        reason,
                    });
                    (cluster, replica_id, command_id, action, CommandAction::Stop)
                }
            };
            let subject = self.bus.subjects.command(&cluster, kind)?;
            let command = v1::ExecutorCommand {
                command_id: command_id.clone(),
                cluster: cluster.clone(),
                deployment: name.to_string(),
                generation: placement.generation,
                action: Some(action),
            };
            self.bus
                .publish(subject, &command, Some(&command_id))
                .await?;
            tracing::debug!(deployment = %name, %cluster, replica = %replica_id, "{}", kind.as_str());
        }
        Ok(())
    }

    /// The rollout a control request names, or why there is none.
    async fn rollout_of(&self, name: &str) -> Result<RolloutState, HandlerError> {
        flotilla_proto::check_name("deployment", name)
            .map_err(|e| HandlerError::invalid("deployment", e.to_string()))?;
        match self.rollouts.get(name).await.map_err(HandlerError::retry)? {
            Some((state, _)) => Ok(state),
            None => Err(HandlerError::invalid(
                "deployment",
                format!("{name} has no rollout"),
            )),
        }
    }

    async fn on_approve(&self, d: Delivery<v1::ApproveRollout>) -> Result<(), HandlerError> {
        let request = d.message;
        let request_id = d.msg_id.clone().unwrap_or(request.request_id.clone());
        let name = request.deployment.clone();
        let state = self.rollout_of(&name).await?;
        if request.generation != 0 && request.generation != state.deployment_generation {
            return Err(HandlerError::invalid(
                "generation",
                format!(
                    "generation {} of {name} is not being rolled out; generation {} is",
                    request.generation, state.deployment_generation
                ),
            ));
        }
        let index = if request.stage.is_empty() {
            if state.phase() != RolloutPhase::AwaitingApproval {
                return Err(HandlerError::invalid(
                    "deployment",
                    format!(
                        "the rollout of {name} is {}, not awaiting approval (name a stage to approve one ahead)",
                        phase_name(state.phase())
                    ),
                ));
            }
            state.current_stage as usize
        } else {
            state
                .stages
                .iter()
                .position(|s| s.name == request.stage)
                .ok_or_else(|| {
                    HandlerError::invalid(
                        "stage",
                        format!(
                            "{name} has no stage {:?}; its stages are {}",
                            request.stage,
                            state
                                .stages
                                .iter()
                                .map(|s| s.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?
        };
        let written = self
            .rollouts
            .update(&name, |cur| {
                let mut next = cur?.clone();
                if next.template != state.template {
                    return None;
                }
                let stage = next.stages.get_mut(index)?;
                if stage.approved {
                    return None;
                }
                stage.approved = true;
                next.updated_at_unix_ms = now_unix_ms();
                Some(next)
            })
            .await
            .map_err(HandlerError::retry)?;
        let current = written.unwrap_or(state);
        let stage = current
            .stages
            .get(index)
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let by = if request.approved_by.is_empty() {
            String::new()
        } else {
            format!(" by {}", request.approved_by)
        };
        self.bus
            .publish_event(
                EventDraft::new(
                    EventType::RolloutApproved,
                    &name,
                    format!("stage {stage} of {name} approved{by}"),
                )
                .id(format!("rollout-approved-{request_id}"))
                .correlation_id(request_id)
                .generation(current.deployment_generation)
                .payload(Payload::Rollout(current)),
            )
            .await
            .map_err(HandlerError::retry)
    }

    async fn on_undo(&self, d: Delivery<v1::UndoRollout>) -> Result<(), HandlerError> {
        let request = d.message;
        let request_id = d.msg_id.clone().unwrap_or(request.request_id.clone());
        let name = request.deployment.clone();
        let state = self.rollout_of(&name).await?;
        let Some(previous) = state.previous_spec.clone() else {
            return Err(HandlerError::invalid(
                "deployment",
                format!("{name} has no earlier version to return to"),
            ));
        };
        let Some((current, _)) = self
            .deployments
            .get(&name)
            .await
            .map_err(HandlerError::retry)?
        else {
            return Err(HandlerError::invalid(
                "deployment",
                format!("{name} does not exist"),
            ));
        };
        self.rollouts
            .update(&name, |cur| {
                let mut next = cur?.clone();
                if next.undo_requested {
                    return None;
                }
                next.undo_requested = true;
                Some(next)
            })
            .await
            .map_err(HandlerError::retry)?;
        let apply = ModelDeployment {
            api_version: current.api_version.clone(),
            kind: current.kind.clone(),
            metadata: current.metadata.clone(),
            spec: Some(previous),
            status: None,
        };
        let apply_id = format!("undo-{request_id}");
        self.bus
            .publish(
                self.bus.subjects.control(ControlSubject::DeploymentApply),
                &apply,
                Some(&apply_id),
            )
            .await
            .map_err(HandlerError::retry)?;
        self.bus
            .publish_event(
                EventDraft::new(
                    EventType::RolloutUndone,
                    &name,
                    format!(
                        "{name}: the spec of generation {} is applied again (request {apply_id})",
                        state.previous_generation
                    ),
                )
                .id(format!("rollout-undone-{request_id}"))
                .correlation_id(request_id)
                .generation(state.deployment_generation)
                .payload(Payload::Rollout(state)),
            )
            .await
            .map_err(HandlerError::retry)
    }
}

/// A phase as `flotilla rollout status` prints it.
pub fn phase_name(phase: RolloutPhase) -> &'static str {
    match phase {
        RolloutPhase::Unspecified => "unknown",
        RolloutPhase::Progressing => "Progressing",
        RolloutPhase::Waiting => "Waiting",
        RolloutPhase::AwaitingApproval => "AwaitingApproval",
        RolloutPhase::Halted => "Halted",
        RolloutPhase::Complete => "Complete",
    }
}
