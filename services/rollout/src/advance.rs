//! The stage machine: one pure step of a deployment's rollout.
//!
//! [`advance`] takes the stored [`RolloutState`] (or none), what the caches
//! show now ([`Observed`]), the time and the service's [`Settings`], and
//! returns the next state, the events announcing it and the commands to
//! send. It reads no clock and does no I/O; the service shell stores the
//! state by compare-and-set, then announces the events, then sends the
//! commands.
//!
//! A step walks the stages from the current one: the replicas of the
//! stages reached so far are planned ([`plan::plan`]), and the current
//! stage's [`Outcome`] decides whether the walk stops there (halted, still
//! rolling, held by a gate) or goes on to the next stage. A new kind of
//! gate is a new [`Gate`] with its [`Hold`]; a new way for a stage to end
//! is a new [`Outcome`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_proto::v1::{
    self, ModelDeploymentSpec, PlacementDecision, PlacementOutcome, ReplicaPhase, ReplicaStatus,
    RolloutPhase, RolloutState, StagePhase, StageStatus,
};
use prost::Message;

use crate::announce::{Announcement, announcements};
use crate::plan::{self, Inputs, Limits, Plan, Step};

/// The implicit last stage of a Staged rollout.
pub const REST_STAGE: &str = "rest";
/// The one stage of a rollout without stages (RollingUpdate, or gates
/// skipped).
pub const ALL_STAGE: &str = "all";

/// The service's settings the stage machine obeys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Failures of the new template's replicas that halt its rollout.
    pub halt_after_failures: u32,
}

/// What the caches show of one deployment that placement has placed.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub deployment: &'a str,
    pub spec: &'a ModelDeploymentSpec,
    /// The generation of `spec` (the deployment's `status.generation`).
    pub spec_generation: u64,
    /// Placement's decision for `spec_generation` (see [`placed_for`]).
    pub placement: &'a PlacementDecision,
    /// The deployment's replicas, of any template.
    pub replicas: &'a [ReplicaStatus],
    /// Clusters that can run replicas now (healthy or degraded).
    pub live: &'a BTreeSet<String>,
    /// Every known cluster with its labels; stages select by them.
    pub clusters: &'a [(String, BTreeMap<String, String>)],
}

/// One step's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Advance {
    /// The state to store; equal to the state before when nothing changed.
    pub state: RolloutState,
    /// What the step announces, in order; published once `state` is stored.
    pub events: Vec<Announcement>,
    /// Commands to send once `state` is stored.
    pub steps: Vec<Step>,
}

/// What holds the next stage back once a stage's replicas are done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// `afterStage.wait`: this long after the stage completed.
    Wait(Duration),
    /// `afterStage.approval`: until `flotilla rollout approve`.
    Approval,
}

/// A gate that is not open yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    Wait { until_ms: i64 },
    Approval,
}

/// What the current stage's observation decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The new template's replicas failed too often.
    Halt,
    /// The stage's replicas are still being replaced.
    Rolling,
    /// The stage's replicas are done; a gate holds the next stage back.
    Held(Hold),
    /// Done, and every gate open: on to the next stage, or complete.
    Pass,
}

/// One stage with the clusters it holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePlan {
    pub name: String,
    pub clusters: BTreeSet<String>,
    /// Checked in order once the stage's replicas are done.
    pub gates: Vec<Gate>,
}

/// The replica template of a spec: what a replica runs. Placement-only
/// fields (clusters, tolerations, rollout strategy) are not part of it,
/// nor is the drift policy (how an executor treats hand edits, not what
/// runs).
///
/// The engine counts only when it says something: a spec without one (or
/// with an empty one) has the digest it had before engines existed, so
/// upgrading Flotilla replaces no replica, while a new image or engine
/// argument is a new template, rolled out by the deployment's strategy.
pub fn template_of_spec(spec: &ModelDeploymentSpec) -> String {
    let model = spec.model.as_ref().map(Message::encode_to_vec);
    let resources = spec.resources.as_ref().map(Message::encode_to_vec);
    let engine = spec
        .engine
        .as_ref()
        .filter(|e| **e != v1::EngineSpec::default())
        .map(Message::encode_to_vec);
    let runtime = spec.runtime.to_le_bytes();
    let mut parts: Vec<&[u8]> = vec![
        model.as_deref().unwrap_or_default(),
        &runtime,
        resources.as_deref().unwrap_or_default(),
    ];
    if let Some(engine) = &engine {
        parts.push(engine);
    }
    plan::template_digest(&parts)
}

/// Whether `placement` is placement's answer to spec generation
/// `spec_generation`. Until it is (or while it found no room) the rollout
/// keeps what runs.
pub fn placed_for(placement: &PlacementDecision, spec_generation: u64) -> bool {
    placement.deployment_generation == spec_generation
        && placement.outcome() != PlacementOutcome::Unschedulable
}

/// The commands that retire a deleted deployment: every replica goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retire {
    /// Newer than any generation the replicas were started for, so
    /// executors take the stops as current.
    pub generation: u64,
    pub steps: Vec<Step>,
}

/// Every replica of a deleted deployment stops.
pub fn retire(deployment: &str, replicas: &[ReplicaStatus], live: &BTreeSet<String>) -> Retire {
    let generation = replicas.iter().map(|r| r.generation).max().unwrap_or(0) + 1;
    let placement = PlacementDecision {
        deployment: deployment.to_string(),
        generation,
        ..Default::default()
    };
    let steps = plan::plan(&Inputs {
        deployment,
        template: "",
        placement: &placement,
        replicas,
        live,
        limits: Limits::new(0, u32::MAX),
        active: None,
        halted: false,
    })
    .steps;
    Retire { generation, steps }
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
        let requirements = flotilla_deployment_spec::check_label_selector(
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
        let after = stage.after_stage.clone().unwrap_or_default();
        let wait = flotilla_deployment_spec::parse_duration(
            &format!("{field}.afterStage.wait"),
            &after.wait,
        )
        .ok()
        .flatten()
        .unwrap_or_default();
        let mut gates = Vec::new();
        if !wait.is_zero() {
            gates.push(Gate::Wait(wait));
        }
        if after.approval {
            gates.push(Gate::Approval);
        }
        out.push(StagePlan {
            name: stage.name.clone(),
            clusters: chosen,
            gates,
        });
    }
    out.push(StagePlan {
        name: REST_STAGE.into(),
        clusters: clusters
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| !taken.contains(n))
            .collect(),
        gates: Vec::new(),
    });
    out
}

fn limits(spec: &ModelDeploymentSpec, desired: u32) -> Limits {
    let rollout = spec.rollout.clone().unwrap_or_default();
    let surge = flotilla_deployment_spec::resolve_int_or_percent(
        "spec.rollout.maxSurge",
        &rollout.max_surge,
        desired,
        true,
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| desired.div_ceil(4));
    let unavailable = flotilla_deployment_spec::resolve_int_or_percent(
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

/// One step of the rollout of `seen.spec`, from `before` (the stored
/// state, if any) at `now_ms`.
pub fn advance(
    before: Option<&RolloutState>,
    seen: &Observed<'_>,
    now_ms: i64,
    settings: &Settings,
) -> Advance {
    let template = template_of_spec(seen.spec);
    let mut state = match before {
        Some(b) if b.template == template => b.clone(),
        _ => begin(before, seen, &template, now_ms),
    };
    state.target_generation = seen.placement.generation;

    let staged = seen
        .spec
        .rollout
        .as_ref()
        .is_some_and(|r| r.strategy() == v1::RolloutStrategy::Staged)
        && !state.skip_gates;
    let stages = if staged {
        resolve_stages(
            seen.spec
                .rollout
                .as_ref()
                .unwrap_or(&v1::RolloutSpec::default()),
            seen.clusters,
        )
    } else {
        vec![StagePlan {
            name: ALL_STAGE.into(),
            clusters: seen.clusters.iter().map(|(n, _)| n.clone()).collect(),
            gates: Vec::new(),
        }]
    };
    align_stages(&mut state, &stages);
    let desired: u32 = seen.placement.assignments.iter().map(|a| a.replicas).sum();
    let limits = limits(seen.spec, desired);

    let steps = loop {
        let current = (state.current_stage as usize).min(stages.len() - 1);
        let complete = state.phase() == RolloutPhase::Complete;
        let halted = state.phase() == RolloutPhase::Halted;
        let active: Option<BTreeSet<String>> = (staged && !complete).then(|| {
            stages[..=current]
                .iter()
                .flat_map(|s| s.clusters.iter().cloned())
                .collect()
        });
        let plan = plan::plan(&Inputs {
            deployment: seen.deployment,
            template: &template,
            placement: seen.placement,
            replicas: seen.replicas,
            live: seen.live,
            limits,
            active: active.as_ref(),
            halted,
        });
        // A finished rollout no longer counts: the halt threshold is about
        // getting the new template up, not about replicas failing later.
        if !complete {
            for f in &plan.failures {
                if !state.failures.contains(f) {
                    state.failures.push(f.clone());
                }
            }
        }
        state.failed_replicas = state.failures.len() as u32;
        if halted || complete {
            break plan.steps;
        }
        let last = current + 1 >= stages.len();
        match judge(
            &state,
            current,
            &stages[current],
            &plan,
            last,
            settings,
            now_ms,
        ) {
            Outcome::Halt => halt(&mut state, seen.deployment, current, settings),
            Outcome::Rolling => {
                rolling(&mut state, current, &stages, &plan, now_ms);
                break plan.steps;
            }
            Outcome::Held(hold) => {
                complete_stage(&mut state, current, staged, now_ms);
                held(&mut state, seen.deployment, current, &stages, hold, now_ms);
                break plan.steps;
            }
            Outcome::Pass => {
                complete_stage(&mut state, current, staged, now_ms);
                if last {
                    finish(&mut state, seen.spec, &plan);
                } else {
                    state.current_stage = (current + 1) as u32;
                }
            }
        }
    };
    state.traffic = traffic_split(&state, seen.spec, staged);
    if before != Some(&state) {
        state.updated_at_unix_ms = now_ms;
    }
    let events = announcements(before, &state);
    Advance {
        state,
        events,
        steps,
    }
}

/// How the gateways split the deployment's requests now. Only a Staged
/// rollout whose stages give a `trafficPercent` splits: while a stage that
/// names one runs (or waits at its gate), the new template takes that
/// share, however many replicas each side has; a halted one gives the new
/// template nothing, so the old version takes every request while it is
/// looked into; a complete one, and a stage without a share (`rest`, say),
/// splits nothing.
pub fn traffic_split(
    state: &RolloutState,
    spec: &ModelDeploymentSpec,
    staged: bool,
) -> Option<v1::TrafficSplit> {
    let stages = &spec.rollout.as_ref()?.stages;
    if !staged || stages.iter().all(|s| s.traffic_percent == 0) {
        return None;
    }
    let new_percent = match state.phase() {
        RolloutPhase::Complete | RolloutPhase::Unspecified => return None,
        RolloutPhase::Halted => 0,
        _ => match stages.get(state.current_stage as usize) {
            Some(stage) if stage.traffic_percent > 0 => stage.traffic_percent.min(100),
            _ => return None,
        },
    };
    Some(v1::TrafficSplit {
        new_template: state.template.clone(),
        new_percent,
    })
}

/// The state of a new rollout: a new template replaces the one `before`
/// rolled out.
fn begin(
    before: Option<&RolloutState>,
    seen: &Observed<'_>,
    template: &str,
    now_ms: i64,
) -> RolloutState {
    let before = before.cloned().unwrap_or_default();
    let others_alive = seen
        .replicas
        .iter()
        .any(|r| plan::template_of(&r.replica_id) != Some(template) && alive_on(r, seen.live));
    let generation = seen.spec_generation;
    RolloutState {
        deployment: seen.deployment.to_string(),
        target_generation: seen.placement.generation,
        previous_generation: before.completed_generation,
        phase: RolloutPhase::Progressing.into(),
        template: template.to_string(),
        deployment_generation: generation,
        completed_spec: before.completed_spec.clone(),
        completed_generation: before.completed_generation,
        previous_spec: before.completed_spec,
        // Nothing running to protect, or going back to what ran: no gates.
        skip_gates: !others_alive || before.undo_requested,
        message: if before.undo_requested {
            format!("undo: rolling back to the spec of generation {generation}")
        } else {
            format!("rolling out spec generation {generation}")
        },
        started_at_unix_ms: now_ms,
        ..Default::default()
    }
}

/// Makes the stored stages those of `stages`: the same names keep their
/// progress (with today's clusters), different ones start over.
fn align_stages(state: &mut RolloutState, stages: &[StagePlan]) {
    let same_names = state.stages.len() == stages.len()
        && state
            .stages
            .iter()
            .zip(stages)
            .all(|(s, p)| s.name == p.name);
    if !same_names {
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
    for (status, p) in state.stages.iter_mut().zip(stages) {
        status.clusters = p.clusters.iter().cloned().collect();
    }
}

/// What the current stage's observation decides.
fn judge(
    state: &RolloutState,
    current: usize,
    stage: &StagePlan,
    plan: &Plan,
    last: bool,
    settings: &Settings,
    now_ms: i64,
) -> Outcome {
    if state.failed_replicas >= settings.halt_after_failures {
        return Outcome::Halt;
    }
    if !plan.active_done {
        return Outcome::Rolling;
    }
    if last {
        return Outcome::Pass;
    }
    let status = state.stages.get(current);
    // A stage that completes in this step completes now.
    let completed_at = status
        .filter(|s| s.phase() == StagePhase::Complete)
        .map_or(now_ms, |s| s.completed_at_unix_ms);
    let approved = status.is_some_and(|s| s.approved);
    stage
        .gates
        .iter()
        .find_map(|gate| match gate {
            Gate::Wait(wait) => {
                let until_ms = completed_at.saturating_add(wait.as_millis() as i64);
                (now_ms < until_ms).then_some(Hold::Wait { until_ms })
            }
            Gate::Approval => (!approved).then_some(Hold::Approval),
        })
        .map_or(Outcome::Pass, Outcome::Held)
}

fn halt(state: &mut RolloutState, name: &str, current: usize, settings: &Settings) {
    state.phase = RolloutPhase::Halted.into();
    state.message = format!(
        "halted: {} replica failures (threshold {}); the previous replicas keep serving; `flotilla rollout undo {name}` returns to the previous spec",
        state.failed_replicas, settings.halt_after_failures
    );
    if let Some(stage) = state.stages.get_mut(current) {
        stage.phase = StagePhase::Failed.into();
    }
}

fn rolling(
    state: &mut RolloutState,
    current: usize,
    stages: &[StagePlan],
    plan: &Plan,
    now_ms: i64,
) {
    state.phase = RolloutPhase::Progressing.into();
    state.message = format!(
        "stage {}: {}/{} replicas of spec generation {} ready",
        stages[current].name, plan.ready, plan.desired, state.deployment_generation
    );
    if let Some(stage) = state.stages.get_mut(current)
        && stage.phase() != StagePhase::Progressing
    {
        if stage.phase() == StagePhase::Pending {
            stage.started_at_unix_ms = now_ms;
        }
        stage.phase = StagePhase::Progressing.into();
    }
}

/// Marks the current stage complete. Without stages the one stage
/// completes with the rollout.
fn complete_stage(state: &mut RolloutState, current: usize, staged: bool, now_ms: i64) {
    if staged
        && let Some(stage) = state.stages.get_mut(current)
        && stage.phase() != StagePhase::Complete
    {
        stage.phase = StagePhase::Complete.into();
        stage.completed_at_unix_ms = now_ms;
        if stage.started_at_unix_ms == 0 {
            stage.started_at_unix_ms = now_ms;
        }
    }
}

fn held(
    state: &mut RolloutState,
    deployment: &str,
    current: usize,
    stages: &[StagePlan],
    hold: Hold,
    now_ms: i64,
) {
    let name = &stages[current].name;
    match hold {
        Hold::Wait { until_ms } => {
            state.phase = RolloutPhase::Waiting.into();
            state.message = format!(
                "stage {name} complete; next stage in {} s",
                (until_ms - now_ms + 999) / 1000
            );
        }
        Hold::Approval => {
            if state.phase() != RolloutPhase::AwaitingApproval {
                state.phase = RolloutPhase::AwaitingApproval.into();
                let next = stages.get(current + 1).map_or("", |s| s.name.as_str());
                state.message = format!(
                    "stage {name} complete; `flotilla rollout approve {deployment}` starts stage {next}"
                );
            }
        }
    }
}

fn finish(state: &mut RolloutState, spec: &ModelDeploymentSpec, plan: &Plan) {
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
}

#[cfg(test)]
mod tests;
