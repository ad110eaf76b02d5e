//! The stage machine, one step at a time (the world is in [`given`]).

use std::collections::{BTreeMap, BTreeSet};

use flotilla_proto::EventType;
use flotilla_proto::v1::{PlacementOutcome, StageGate};

use super::*;

mod given;
use given::*;

struct Want {
    phase: RolloutPhase,
    stage: u32,
    events: &'static [EventType],
    /// Clusters a replica starts on, then stops on.
    starts: &'static [&'static str],
    stops: &'static [&'static str],
    skip_gates: bool,
    message: &'static str,
}

/// A case: what it shows, the step to take, what it must decide.
type Row = (&'static str, fn() -> Given, Want);

fn clusters_of(steps: &[Step], starts: bool) -> Vec<&str> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Start { cluster, .. } if starts => Some(cluster.as_str()),
            Step::Stop { cluster, .. } if !starts => Some(cluster.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_stage_machine_step_by_step() {
    use EventType as E;
    use RolloutPhase as P;
    let table: Vec<Row> = vec![
        (
            "a first rollout skips the gates and starts everywhere",
            first_rollout,
            Want {
                phase: P::Progressing,
                stage: 0,
                events: &[E::RolloutStarted],
                starts: &["a", "b", "c"],
                stops: &[],
                skip_gates: true,
                message: "stage all: 0/3 replicas",
            },
        ),
        (
            "a first rollout completes without stopping at the approval",
            first_rollout_ready,
            Want {
                phase: P::Complete,
                stage: 0,
                events: &[E::RolloutCompleted],
                starts: &[],
                stops: &[],
                skip_gates: true,
                message: "spec generation 1 rolled out: 3 replicas ready",
            },
        ),
        (
            "a staged rollout starts with its first stage only",
            staged_begins,
            Want {
                phase: P::Progressing,
                stage: 0,
                events: &[E::RolloutStarted, E::RolloutStageStarted],
                starts: &["a"],
                stops: &[],
                skip_gates: false,
                message: "stage canary: 0/3 replicas of spec generation 2 ready",
            },
        ),
        (
            "a done stage begins its wait",
            stage_done_wait_begins,
            Want {
                phase: P::Waiting,
                stage: 0,
                events: &[E::RolloutStageCompleted],
                starts: &[],
                stops: &[],
                skip_gates: false,
                message: "stage canary complete; next stage in 60 s",
            },
        ),
        (
            "half way through the wait, nothing moves",
            wait_half_over,
            Want {
                phase: P::Waiting,
                stage: 0,
                events: &[],
                starts: &[],
                stops: &[],
                skip_gates: false,
                message: "next stage in 30 s",
            },
        ),
        (
            "the wait over, the next stage starts",
            wait_over,
            Want {
                phase: P::Progressing,
                stage: 1,
                events: &[E::RolloutStageStarted],
                starts: &["b"],
                stops: &[],
                skip_gates: false,
                message: "stage main: 1/3 replicas",
            },
        ),
        (
            "a done stage asks for approval",
            stage_done_approval_asked,
            Want {
                phase: P::AwaitingApproval,
                stage: 0,
                events: &[E::RolloutStageCompleted, E::RolloutAwaitingApproval],
                starts: &[],
                stops: &[],
                skip_gates: false,
                message: "`flotilla rollout approve chat` starts stage main",
            },
        ),
        (
            "the approval is asked for once",
            still_awaiting,
            Want {
                phase: P::AwaitingApproval,
                stage: 0,
                events: &[],
                starts: &[],
                stops: &[],
                skip_gates: false,
                message: "`flotilla rollout approve chat` starts stage main",
            },
        ),
        (
            "an approval starts the next stage",
            approved,
            Want {
                phase: P::Progressing,
                stage: 1,
                events: &[E::RolloutStageStarted],
                starts: &["b"],
                stops: &[],
                skip_gates: false,
                message: "stage main: 1/3 replicas",
            },
        ),
        (
            "a failure below the threshold is retried",
            first_failure,
            Want {
                phase: P::Progressing,
                stage: 0,
                events: &[],
                starts: &["a"],
                stops: &[],
                skip_gates: false,
                message: "stage canary: 0/3",
            },
        ),
        (
            "the threshold halts: nothing retried, the old replicas kept",
            second_failure,
            Want {
                phase: P::Halted,
                stage: 0,
                events: &[E::RolloutHalted],
                starts: &[],
                stops: &[],
                skip_gates: false,
                message: "halted: 2 replica failures (threshold 2)",
            },
        ),
        (
            "a halted rollout stays halted",
            halted_stays,
            Want {
                phase: P::Halted,
                stage: 0,
                events: &[],
                starts: &[],
                stops: &[],
                skip_gates: false,
                message: "`flotilla rollout undo chat`",
            },
        ),
        (
            "an undo skips the gates: the old replica starts again on every cluster",
            undo,
            Want {
                phase: P::Progressing,
                stage: 0,
                events: &[E::RolloutStarted],
                starts: &["a"],
                stops: &[],
                skip_gates: true,
                message: "stage all: 2/3 replicas of spec generation 3 ready",
            },
        ),
        (
            "a template change mid-stage starts over and stops the half-started replica",
            template_change_mid_stage,
            Want {
                phase: P::Progressing,
                stage: 0,
                events: &[E::RolloutStarted, E::RolloutStageStarted],
                starts: &[],
                stops: &["a"],
                skip_gates: false,
                message: "stage canary: 0/3 replicas of spec generation 3 ready",
            },
        ),
        (
            "lost capacity is replaced at once, gate or not",
            capacity_lost_at_a_gate,
            Want {
                phase: P::AwaitingApproval,
                stage: 0,
                events: &[],
                starts: &["b"],
                stops: &["c"],
                skip_gates: false,
                message: "`flotilla rollout approve chat`",
            },
        ),
    ];
    for (name, given, want) in table {
        let Given {
            world,
            before,
            now_ms,
        } = given();
        let got = world.step(before.as_ref(), now_ms);
        let state = &got.state;
        assert_eq!(state.phase(), want.phase, "{name}: {state:#?}");
        assert_eq!(state.current_stage, want.stage, "{name}");
        let events: Vec<EventType> = got.events.iter().map(|e| e.ty).collect();
        assert_eq!(events, want.events, "{name}");
        assert_eq!(clusters_of(&got.steps, true), want.starts, "{name}");
        assert_eq!(clusters_of(&got.steps, false), want.stops, "{name}");
        assert_eq!(state.skip_gates, want.skip_gates, "{name}");
        assert!(
            state.message.contains(want.message),
            "{name}: {:?}",
            state.message
        );
        // The events are those between the two states, so a stored state
        // can be announced by whoever finds it.
        assert_eq!(got.events, announcements(before.as_ref(), state), "{name}");
        // Time moves the stored state only when it changes.
        if before.as_ref() != Some(state) {
            assert_eq!(state.updated_at_unix_ms, now_ms, "{name}");
        }
    }
}

#[test]
fn a_step_is_a_function_of_its_inputs() {
    let given = approved();
    let once = given.world.step(given.before.as_ref(), given.now_ms);
    let again = given.world.step(given.before.as_ref(), given.now_ms);
    assert_eq!(once, again);
    // And a step from its own result at the same time changes nothing.
    let settled = given.world.step(Some(&once.state), given.now_ms);
    assert_eq!(settled.state, once.state);
    assert!(settled.events.is_empty());
}

#[test]
fn a_rollout_remembers_what_to_undo_to() {
    let given = staged_begins();
    let state = given.world.step(given.before.as_ref(), given.now_ms).state;
    assert_eq!(state.template, template(2));
    assert_eq!(state.previous_spec, Some(spec(1, &approval())));
    assert_eq!(state.previous_generation, 1);
    assert_eq!(state.completed_generation, 1);
    let undo = undo();
    let got = undo.world.step(undo.before.as_ref(), undo.now_ms);
    assert_eq!(
        got.events[0].message,
        "undo: rolling back to the spec of generation 3"
    );
    assert!(!got.state.undo_requested);
    assert_eq!(got.state.template, template(1));
    assert_eq!(got.state.previous_spec, Some(spec(1, &approval())));
}

#[test]
fn stages_take_clusters_by_label_first_match_wins_and_rest_takes_the_others() {
    let mut world = World::new(2, approval(), Vec::new());
    world.clusters.push(("d".into(), BTreeMap::new()));
    let stages = resolve_stages(world.spec.rollout.as_ref().unwrap(), &world.clusters);
    let got: Vec<(&str, Vec<&str>, &[Gate])> = stages
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.clusters.iter().map(String::as_str).collect(),
                s.gates.as_slice(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("canary", vec!["a"], &[Gate::Approval][..]),
            ("main", vec!["b", "c"], &[][..]),
            (REST_STAGE, vec!["d"], &[][..]),
        ]
    );
    let both = StageGate {
        wait: "90s".into(),
        approval: true,
    };
    let world = World::new(2, both, Vec::new());
    let stages = resolve_stages(world.spec.rollout.as_ref().unwrap(), &world.clusters);
    assert_eq!(
        stages[0].gates,
        vec![Gate::Wait(Duration::from_secs(90)), Gate::Approval]
    );
}

#[test]
fn a_rollout_waits_for_placement_to_answer_its_spec() {
    let world = World::new(2, approval(), Vec::new());
    assert!(placed_for(&world.placement, 2));
    assert!(!placed_for(&world.placement, 3), "placement is behind");
    let mut unschedulable = world.placement.clone();
    unschedulable.outcome = PlacementOutcome::Unschedulable.into();
    assert!(!placed_for(&unschedulable, 2), "no room: keep what runs");
}

#[test]
fn a_deleted_deployment_stops_every_replica() {
    let mut replicas = v1_ready();
    replicas[0].generation = 4;
    replicas[1].phase = ReplicaPhase::Stopped.into();
    let live: BTreeSet<String> = ["a", "b"].iter().map(|c| c.to_string()).collect();
    let retire = retire("chat", &replicas, &live);
    assert_eq!(retire.generation, 5);
    let stops: Vec<(&str, &str)> = retire
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Stop {
                cluster, reason, ..
            } => Some((cluster.as_str(), reason.as_str())),
            Step::Start { .. } => None,
        })
        .collect();
    assert_eq!(
        stops,
        vec![
            ("a", "replaced by placement generation 5"),
            ("c", "its cluster is gone"),
        ]
    );
}

#[test]
fn an_engine_is_part_of_the_template_only_when_set() {
    let before = spec(1, &approval());
    // The digest of a spec without an engine is what it was before
    // engines existed: model, runtime, resources.
    let model = before.model.as_ref().map(Message::encode_to_vec);
    let old = plan::template_digest(&[
        model.as_deref().unwrap_or_default(),
        &before.runtime.to_le_bytes(),
        &[],
    ]);
    assert_eq!(template_of_spec(&before), old);
    let empty = ModelDeploymentSpec {
        engine: Some(v1::EngineSpec::default()),
        ..before.clone()
    };
    assert_eq!(
        template_of_spec(&empty),
        old,
        "an empty engine is no engine"
    );
    // Nor do the drift policy or placement-only fields make a new template.
    let report_only = ModelDeploymentSpec {
        drift_policy: v1::DriftPolicy::ReportOnly.into(),
        ..before.clone()
    };
    assert_eq!(template_of_spec(&report_only), old);

    let image = |image: &str| ModelDeploymentSpec {
        engine: Some(v1::EngineSpec {
            image: image.into(),
            ..Default::default()
        }),
        ..before.clone()
    };
    let (v085, v090) = (
        image("vllm/vllm-openai:v0.8.5"),
        image("vllm/vllm-openai:v0.9.0"),
    );
    assert_ne!(template_of_spec(&v085), old);
    assert_ne!(template_of_spec(&v085), template_of_spec(&v090));
    let mut with_args = v085.clone();
    with_args.engine.as_mut().unwrap().extra_args = vec!["--enable-prefix-caching".into()];
    assert_ne!(template_of_spec(&with_args), template_of_spec(&v085));
}

#[test]
fn a_new_engine_image_rolls_out_stage_by_stage() {
    // Version 1 complete everywhere; then only the image changes.
    let mut world = World::new(1, approval(), v1_ready());
    world.spec.engine = Some(v1::EngineSpec {
        image: "vllm/vllm-openai:v0.9.0".into(),
        ..Default::default()
    });
    world.spec_generation = 2;
    world.placement.generation = 2;
    world.placement.deployment_generation = 2;
    let got = world.step(Some(&v1_complete()), T0);
    assert_eq!(got.state.template, template_of_spec(&world.spec));
    assert_ne!(got.state.template, template(1));
    assert_eq!(got.state.phase(), RolloutPhase::Progressing);
    assert_eq!(clusters_of(&got.steps, true), ["a"], "the canary only");
    assert!(clusters_of(&got.steps, false).is_empty(), "surge first");
}

#[test]
fn the_traffic_split_follows_the_current_stage_and_gives_a_halted_version_nothing() {
    use RolloutPhase as P;
    let spec = |percents: &[u32], strategy: v1::RolloutStrategy| ModelDeploymentSpec {
        rollout: Some(v1::RolloutSpec {
            strategy: strategy.into(),
            stages: percents
                .iter()
                .enumerate()
                .map(|(i, p)| v1::RolloutStage {
                    name: format!("s{i}"),
                    traffic_percent: *p,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let staged = v1::RolloutStrategy::Staged;
    /// What it shows, stage percents, staged, phase, current stage, share.
    type SplitRow = (&'static str, &'static [u32], bool, P, u32, Option<u32>);
    let table: [SplitRow; 9] = [
        (
            "a canary stage takes its share",
            &[10, 50],
            true,
            P::Progressing,
            0,
            Some(10),
        ),
        (
            "and keeps it at its gate",
            &[10, 50],
            true,
            P::AwaitingApproval,
            0,
            Some(10),
        ),
        (
            "the next stage takes the next share",
            &[10, 50],
            true,
            P::Waiting,
            1,
            Some(50),
        ),
        (
            "the rest stage splits nothing",
            &[10, 50],
            true,
            P::Progressing,
            2,
            None,
        ),
        (
            "a stage without a share splits nothing",
            &[0, 50],
            true,
            P::Progressing,
            0,
            None,
        ),
        (
            "halted: the old version takes everything",
            &[10, 50],
            true,
            P::Halted,
            1,
            Some(0),
        ),
        (
            "complete: nothing to split",
            &[10, 50],
            true,
            P::Complete,
            2,
            None,
        ),
        (
            "no shares named: no split",
            &[0, 0],
            true,
            P::Progressing,
            0,
            None,
        ),
        (
            "gates skipped (first rollout, undo): no split",
            &[10],
            false,
            P::Progressing,
            0,
            None,
        ),
    ];
    for (what, percents, is_staged, phase, current, want) in table {
        let state = RolloutState {
            template: "t2".into(),
            phase: phase.into(),
            current_stage: current,
            ..Default::default()
        };
        let split = traffic_split(&state, &spec(percents, staged), is_staged);
        assert_eq!(split.as_ref().map(|s| s.new_percent), want, "{what}");
        if let Some(split) = split {
            assert_eq!(split.new_template, "t2", "{what}");
        }
    }
}
