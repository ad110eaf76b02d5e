//! The events that announce a rollout's progress, as a function of two
//! stored states: the last one whose events are all published, and the
//! one stored now.
//!
//! Deriving events from states (rather than remembering them) is what lets
//! the state be stored first: whoever finds a stored state that owes
//! events (the instance that wrote it, after a failed publish; a restarted
//! or second instance, after a crash between the write and the events) can
//! publish them from the state alone. Each event's id is fixed per
//! (deployment, template, spec generation, step), so the events stream
//! keeps it once within its dedup window however many publish it.

use flotilla_proto::EventType;
use flotilla_proto::v1::{RolloutPhase, RolloutState, StagePhase, StageStatus};

use crate::advance::ALL_STAGE;

/// Every event type [`announcements`] produces.
pub const STEP_EVENTS: [EventType; 6] = [
    EventType::RolloutStarted,
    EventType::RolloutStageStarted,
    EventType::RolloutStageCompleted,
    EventType::RolloutAwaitingApproval,
    EventType::RolloutHalted,
    EventType::RolloutCompleted,
];

/// An event to publish about a rollout, with the stored state as payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub ty: EventType,
    /// The event id (`Nats-Msg-Id`).
    pub id: String,
    pub message: String,
}

/// The events that take an observer from `before` to `after`, in the order
/// they happened. `before` is `None` when nothing was announced.
pub fn announcements(before: Option<&RolloutState>, after: &RolloutState) -> Vec<Announcement> {
    if after.template.is_empty() || before == Some(after) {
        return Vec::new();
    }
    // Another template is another rollout: nothing of it was announced.
    let same = before.filter(|b| b.template == after.template);
    let id = |what: &str| {
        format!(
            "rollout-{}-{}-g{}-{}-{what}",
            after.deployment, after.template, after.deployment_generation, after.started_at_unix_ms
        )
    };
    let mut out = Vec::new();
    let mut say = |ty, what: &str, message: String| {
        out.push(Announcement {
            ty,
            id: id(what),
            message,
        })
    };
    if same.is_none() {
        let generation = after.deployment_generation;
        let message = if before.is_some_and(|b| b.undo_requested) {
            format!("undo: rolling back to the spec of generation {generation}")
        } else {
            format!("rolling out spec generation {generation}")
        };
        say(EventType::RolloutStarted, "started", message);
    }
    // Stages that were laid out again (other names) start over.
    let earlier: &[StageStatus] = match same {
        Some(b)
            if b.stages.len() == after.stages.len()
                && b.stages
                    .iter()
                    .zip(&after.stages)
                    .all(|(x, y)| x.name == y.name) =>
        {
            &b.stages
        }
        _ => &[],
    };
    let was = |k: usize| match earlier.get(k).map(StageStatus::phase) {
        None | Some(StagePhase::Unspecified) => StagePhase::Pending,
        Some(phase) => phase,
    };
    let awaiting = after.phase() == RolloutPhase::AwaitingApproval
        && !same.is_some_and(|b| {
            b.phase() == RolloutPhase::AwaitingApproval && b.current_stage == after.current_stage
        });
    for (k, stage) in after.stages.iter().enumerate() {
        // A stage without clusters (an empty `rest`) is no news.
        if staged(after) && !stage.clusters.is_empty() {
            if was(k) == StagePhase::Pending && stage.phase() == StagePhase::Progressing {
                say(
                    EventType::RolloutStageStarted,
                    &format!("stage-{k}-started"),
                    format!("stage {} started", stage.name),
                );
            }
            if was(k) != StagePhase::Complete && stage.phase() == StagePhase::Complete {
                say(
                    EventType::RolloutStageCompleted,
                    &format!("stage-{k}-completed"),
                    format!(
                        "stage {} complete: clusters {}",
                        stage.name,
                        stage.clusters.join(", ")
                    ),
                );
            }
        }
        if awaiting && k == after.current_stage as usize {
            say(
                EventType::RolloutAwaitingApproval,
                &format!("stage-{k}-awaiting-approval"),
                after.message.clone(),
            );
        }
    }
    let newly =
        |phase: RolloutPhase| after.phase() == phase && same.is_none_or(|b| b.phase() != phase);
    if newly(RolloutPhase::Halted) {
        say(EventType::RolloutHalted, "halted", after.message.clone());
    }
    if newly(RolloutPhase::Complete) {
        say(
            EventType::RolloutCompleted,
            "completed",
            after.message.clone(),
        );
    }
    out
}

/// Whether a state's rollout goes by stages: one without stages has the
/// single stage `all` (user stages are always followed by `rest`).
fn staged(state: &RolloutState) -> bool {
    !matches!(&state.stages[..], [only] if only.name == ALL_STAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, phase: StagePhase, clusters: &[&str]) -> StageStatus {
        StageStatus {
            name: name.into(),
            phase: phase.into(),
            clusters: clusters.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        }
    }

    fn state(template: &str, phase: RolloutPhase, stages: Vec<StageStatus>) -> RolloutState {
        RolloutState {
            deployment: "chat".into(),
            template: template.into(),
            deployment_generation: 2,
            phase: phase.into(),
            message: format!("{phase:?}"),
            stages,
            started_at_unix_ms: 1_000,
            ..Default::default()
        }
    }

    fn ids(events: &[Announcement]) -> Vec<&str> {
        events
            .iter()
            .map(|e| e.id.trim_start_matches("rollout-chat-bbbbbbbb-g2-1000-"))
            .collect()
    }

    #[test]
    fn a_rollout_begun_again_is_named_apart_from_the_one_before() {
        let first = state("bbbbbbbb", RolloutPhase::Progressing, Vec::new());
        let again = RolloutState {
            started_at_unix_ms: 5_000,
            ..first.clone()
        };
        let started = |s: &RolloutState| announcements(None, s)[0].id.clone();
        assert_ne!(started(&first), started(&again));
        assert_eq!(started(&first), started(&first.clone()));
    }

    #[test]
    fn events_follow_the_difference_between_two_states() {
        use RolloutPhase as R;
        use StagePhase as S;
        let canary_rolling = vec![
            stage("canary", S::Progressing, &["a"]),
            stage("rest", S::Pending, &["b"]),
        ];
        let canary_done = vec![
            stage("canary", S::Complete, &["a"]),
            stage("rest", S::Pending, &["b"]),
        ];
        let all_done = vec![
            stage("canary", S::Complete, &["a"]),
            stage("rest", S::Complete, &["b"]),
        ];
        let mut awaiting = state("bbbbbbbb", R::AwaitingApproval, canary_done.clone());
        awaiting.stages[0].approved = true;
        let older = state(
            "aaaaaaaa",
            R::Complete,
            vec![stage("all", S::Complete, &["a"])],
        );
        let undoing = RolloutState {
            undo_requested: true,
            ..older.clone()
        };
        let table: Vec<(&str, Option<RolloutState>, RolloutState, Vec<&str>)> = vec![
            (
                "a new template starts a rollout",
                Some(older.clone()),
                state("bbbbbbbb", R::Progressing, canary_rolling.clone()),
                vec!["started", "stage-0-started"],
            ),
            (
                "nothing stored before",
                None,
                state("bbbbbbbb", R::Progressing, canary_rolling.clone()),
                vec!["started", "stage-0-started"],
            ),
            (
                "the same state owes nothing",
                Some(awaiting.clone()),
                awaiting.clone(),
                vec![],
            ),
            (
                "an approval owes nothing",
                Some(state("bbbbbbbb", R::AwaitingApproval, canary_done.clone())),
                awaiting.clone(),
                vec![],
            ),
            (
                "a stage completes and waits for approval",
                Some(state("bbbbbbbb", R::Progressing, canary_rolling.clone())),
                state("bbbbbbbb", R::AwaitingApproval, canary_done.clone()),
                vec!["stage-0-completed", "stage-0-awaiting-approval"],
            ),
            (
                "several steps at once come out in order",
                Some(older.clone()),
                state("bbbbbbbb", R::Complete, all_done.clone()),
                vec![
                    "started",
                    "stage-0-completed",
                    "stage-1-completed",
                    "completed",
                ],
            ),
            (
                "a rollout without stages says no stage news",
                Some(state(
                    "bbbbbbbb",
                    R::Progressing,
                    vec![stage("all", S::Progressing, &["a"])],
                )),
                state(
                    "bbbbbbbb",
                    R::Complete,
                    vec![stage("all", S::Complete, &["a"])],
                ),
                vec!["completed"],
            ),
            (
                "an empty stage is no news",
                Some(state("bbbbbbbb", R::Progressing, canary_rolling.clone())),
                state(
                    "bbbbbbbb",
                    R::Complete,
                    vec![
                        stage("canary", S::Complete, &["a"]),
                        stage("rest", S::Complete, &[]),
                    ],
                ),
                vec!["stage-0-completed", "completed"],
            ),
            (
                "a halt",
                Some(state("bbbbbbbb", R::Progressing, canary_rolling.clone())),
                state(
                    "bbbbbbbb",
                    R::Halted,
                    vec![
                        stage("canary", S::Failed, &["a"]),
                        stage("rest", S::Pending, &["b"]),
                    ],
                ),
                vec!["halted"],
            ),
        ];
        for (name, before, after, want) in table {
            assert_eq!(ids(&announcements(before.as_ref(), &after)), want, "{name}");
        }
        let undo = announcements(
            Some(&undoing),
            &state(
                "bbbbbbbb",
                R::Progressing,
                vec![stage("all", S::Progressing, &["a"])],
            ),
        );
        assert!(undo[0].message.starts_with("undo: "), "{undo:?}");
    }

    #[test]
    fn every_event_type_produced_is_listed() {
        let older = state("aaaaaaaa", RolloutPhase::Complete, vec![]);
        let mut seen = std::collections::BTreeSet::new();
        for (phase, stage_phase) in [
            (RolloutPhase::Complete, StagePhase::Complete),
            (RolloutPhase::Halted, StagePhase::Progressing),
            (RolloutPhase::AwaitingApproval, StagePhase::Complete),
        ] {
            let after = state(
                "bbbbbbbb",
                phase,
                vec![
                    stage("canary", stage_phase, &["a"]),
                    stage("rest", StagePhase::Pending, &[]),
                ],
            );
            for e in announcements(Some(&older), &after) {
                seen.insert(e.ty.to_string());
            }
        }
        let listed: std::collections::BTreeSet<String> =
            STEP_EVENTS.iter().map(ToString::to_string).collect();
        assert_eq!(seen, listed);
    }
}
