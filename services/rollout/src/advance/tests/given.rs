//! The world the stage machine's tests step through: three clusters, `a`
//! (the canary stage) and `b`, `c` (the main stage), one replica each, and
//! the states a rollout passes on them.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_proto::v1::{
    ClusterAssignment, GpuRequirements, LabelSelector, ModelSource, PlacementOutcome,
    ResourceRequirements, RolloutSpec, RolloutStage, RolloutStrategy, StageGate,
};

use super::super::*;

pub(super) const SETTINGS: Settings = Settings {
    halt_after_failures: 2,
};
pub(super) const T0: i64 = 1_000_000;
pub(super) const MINUTE: i64 = 60_000;

/// Version 1 runs on no particular GPU; versions 2 and 3 ask for 1 and 2
/// GPUs: three templates. `gate` follows the canary stage.
pub(super) fn spec(version: u32, gate: &StageGate) -> ModelDeploymentSpec {
    let stage = |name: &str, label: &str, gate: Option<StageGate>| RolloutStage {
        name: name.into(),
        cluster_selector: Some(LabelSelector {
            match_labels: BTreeMap::from([("stage".to_string(), label.to_string())]),
            ..Default::default()
        }),
        after_stage: gate,
        traffic_percent: 0,
    };
    ModelDeploymentSpec {
        model: Some(ModelSource {
            preset: "smollm2-135m-instruct".into(),
            ..Default::default()
        }),
        replicas: 3,
        resources: (version > 1).then(|| ResourceRequirements {
            gpu: Some(GpuRequirements {
                count: version - 1,
                ..Default::default()
            }),
        }),
        rollout: Some(RolloutSpec {
            strategy: RolloutStrategy::Staged.into(),
            max_surge: "1".into(),
            stages: vec![
                stage("canary", "canary", Some(gate.clone())),
                stage("main", "main", None),
            ],
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(super) fn approval() -> StageGate {
    StageGate {
        approval: true,
        ..Default::default()
    }
}

pub(super) fn wait_a_minute() -> StageGate {
    StageGate {
        wait: "1m".into(),
        ..Default::default()
    }
}

pub(super) fn template(version: u32) -> String {
    template_of_spec(&spec(version, &StageGate::default()))
}

pub(super) fn replica(version: u32, cluster: &str, phase: ReplicaPhase, at: i64) -> ReplicaStatus {
    ReplicaStatus {
        replica_id: plan::replica_id("chat", &template(version), cluster, 0),
        cluster: cluster.into(),
        deployment: "chat".into(),
        phase: phase.into(),
        updated_at_unix_ms: at,
        ..Default::default()
    }
}

/// What the caches hold.
pub(super) struct World {
    pub(super) spec: ModelDeploymentSpec,
    pub(super) spec_generation: u64,
    pub(super) placement: PlacementDecision,
    pub(super) replicas: Vec<ReplicaStatus>,
    pub(super) live: BTreeSet<String>,
    pub(super) clusters: Vec<(String, BTreeMap<String, String>)>,
}

impl World {
    /// `version` of the spec placed one replica on each cluster, over
    /// `replicas`.
    pub(super) fn new(version: u32, gate: StageGate, replicas: Vec<ReplicaStatus>) -> Self {
        let label = |stage: &str| BTreeMap::from([("stage".to_string(), stage.to_string())]);
        let generation = u64::from(version);
        Self {
            spec: spec(version, &gate),
            spec_generation: generation,
            placement: PlacementDecision {
                deployment: "chat".into(),
                generation,
                deployment_generation: generation,
                assignments: ["a", "b", "c"]
                    .iter()
                    .map(|c| ClusterAssignment {
                        cluster: c.to_string(),
                        replicas: 1,
                        ..Default::default()
                    })
                    .collect(),
                outcome: PlacementOutcome::Placed.into(),
                ..Default::default()
            },
            replicas,
            live: ["a", "b", "c"].iter().map(|c| c.to_string()).collect(),
            clusters: vec![
                ("a".into(), label("canary")),
                ("b".into(), label("main")),
                ("c".into(), label("main")),
            ],
        }
    }

    pub(super) fn step(&self, before: Option<&RolloutState>, now_ms: i64) -> Advance {
        let seen = Observed {
            deployment: "chat",
            spec: &self.spec,
            spec_generation: self.spec_generation,
            placement: &self.placement,
            replicas: &self.replicas,
            live: &self.live,
            clusters: &self.clusters,
        };
        advance(before, &seen, now_ms, &SETTINGS)
    }
}

pub(super) fn v1_ready() -> Vec<ReplicaStatus> {
    ["a", "b", "c"]
        .iter()
        .map(|c| replica(1, c, ReplicaPhase::Ready, 1))
        .collect()
}

/// Version 1 rolled out (its first rollout, so in one step).
pub(super) fn v1_complete() -> RolloutState {
    World::new(1, approval(), v1_ready()).step(None, T0).state
}

/// Version 2 begun: its canary stage is rolling.
pub(super) fn canary_rolling(gate: StageGate) -> RolloutState {
    World::new(2, gate, v1_ready())
        .step(Some(&v1_complete()), T0)
        .state
}

/// The canary replaced: version 2 ready on `a`, version 1 stopped there.
pub(super) fn canary_replaced(gate: StageGate) -> World {
    World::new(
        2,
        gate,
        vec![
            replica(1, "a", ReplicaPhase::Stopped, 2),
            replica(2, "a", ReplicaPhase::Ready, 2),
            replica(1, "b", ReplicaPhase::Ready, 1),
            replica(1, "c", ReplicaPhase::Ready, 1),
        ],
    )
}

pub(super) fn canary_done(gate: StageGate) -> RolloutState {
    canary_replaced(gate.clone())
        .step(Some(&canary_rolling(gate)), T0 + MINUTE)
        .state
}

/// A step to take: the world, the stored state, the time.
pub(super) struct Given {
    pub(super) world: World,
    pub(super) before: Option<RolloutState>,
    pub(super) now_ms: i64,
}

/// What the step must decide.
pub(super) fn first_rollout() -> Given {
    Given {
        world: World::new(1, approval(), Vec::new()),
        before: None,
        now_ms: T0,
    }
}

pub(super) fn first_rollout_ready() -> Given {
    let before = first_rollout().world.step(None, T0).state;
    Given {
        world: World::new(1, approval(), v1_ready()),
        before: Some(before),
        now_ms: T0 + MINUTE,
    }
}

pub(super) fn staged_begins() -> Given {
    Given {
        world: World::new(2, wait_a_minute(), v1_ready()),
        before: Some(v1_complete()),
        now_ms: T0,
    }
}

pub(super) fn stage_done_wait_begins() -> Given {
    Given {
        world: canary_replaced(wait_a_minute()),
        before: Some(canary_rolling(wait_a_minute())),
        now_ms: T0 + MINUTE,
    }
}

pub(super) fn wait_half_over() -> Given {
    Given {
        world: canary_replaced(wait_a_minute()),
        before: Some(canary_done(wait_a_minute())),
        now_ms: T0 + MINUTE + MINUTE / 2,
    }
}

pub(super) fn wait_over() -> Given {
    Given {
        now_ms: T0 + 2 * MINUTE,
        ..wait_half_over()
    }
}

pub(super) fn stage_done_approval_asked() -> Given {
    Given {
        world: canary_replaced(approval()),
        before: Some(canary_rolling(approval())),
        now_ms: T0 + MINUTE,
    }
}

pub(super) fn still_awaiting() -> Given {
    Given {
        world: canary_replaced(approval()),
        before: Some(canary_done(approval())),
        now_ms: T0 + 10 * MINUTE,
    }
}

pub(super) fn approved() -> Given {
    let mut before = canary_done(approval());
    before.stages[0].approved = true;
    Given {
        before: Some(before),
        ..still_awaiting()
    }
}

pub(super) fn canary_failed(at: i64) -> World {
    let mut world = World::new(2, approval(), v1_ready());
    world
        .replicas
        .push(replica(2, "a", ReplicaPhase::Failed, at));
    world
}

pub(super) fn first_failure() -> Given {
    Given {
        world: canary_failed(10),
        before: Some(canary_rolling(approval())),
        now_ms: T0 + MINUTE,
    }
}

pub(super) fn second_failure() -> Given {
    let first = first_failure();
    let before = first.world.step(first.before.as_ref(), first.now_ms).state;
    Given {
        world: canary_failed(20),
        before: Some(before),
        now_ms: T0 + 2 * MINUTE,
    }
}

pub(super) fn halted_stays() -> Given {
    let second = second_failure();
    let before = second
        .world
        .step(second.before.as_ref(), second.now_ms)
        .state;
    Given {
        before: Some(before),
        now_ms: T0 + 3 * MINUTE,
        ..second_failure()
    }
}

/// `rollout undo` while the canary waits: version 1's spec applied
/// again, as generation 3.
pub(super) fn undo() -> Given {
    let mut before = canary_done(approval());
    before.undo_requested = true;
    let mut world = canary_replaced(approval());
    world.spec = spec(1, &approval());
    world.spec_generation = 3;
    world.placement.generation = 3;
    world.placement.deployment_generation = 3;
    Given {
        world,
        before: Some(before),
        now_ms: T0 + 4 * MINUTE,
    }
}

pub(super) fn template_change_mid_stage() -> Given {
    let mut world = World::new(3, approval(), v1_ready());
    world
        .replicas
        .push(replica(2, "a", ReplicaPhase::Starting, 5));
    Given {
        world,
        before: Some(canary_rolling(approval())),
        now_ms: T0 + MINUTE,
    }
}

/// Cluster `c` died while the canary waits for approval; placement moved
/// its replica to `b`.
pub(super) fn capacity_lost_at_a_gate() -> Given {
    let mut world = canary_replaced(approval());
    world.live.remove("c");
    world.placement.generation = 3;
    world.placement.assignments[1].replicas = 2;
    world.placement.assignments.remove(2);
    Given {
        world,
        before: Some(canary_done(approval())),
        now_ms: T0 + 2 * MINUTE,
    }
}
