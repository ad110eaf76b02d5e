//! The control requests on rollouts: approve a stage, undo a rollout.
//! Each writes KV `rollouts` first and announces the change after, as the
//! stage machine does.

use flotilla_kit::{Delivery, EventDraft, HandlerError, now_unix_ms};
use flotilla_proto::v1::{self, ModelDeployment, RolloutPhase, RolloutState, event::Payload};
use flotilla_proto::{ControlSubject, EventType};

use crate::{Rollouts, phase_name};

impl Rollouts {
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

    pub(crate) async fn on_approve(
        &self,
        d: Delivery<v1::ApproveRollout>,
    ) -> Result<(), HandlerError> {
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

    pub(crate) async fn on_undo(&self, d: Delivery<v1::UndoRollout>) -> Result<(), HandlerError> {
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
