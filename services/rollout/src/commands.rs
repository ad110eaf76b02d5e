//! Planned steps into executor commands, and their sending.

use flotilla_kit::KitError;
use flotilla_proto::CommandAction;
use flotilla_proto::v1::{self, ModelDeploymentSpec, executor_command::Action};
use tracing::Instrument;

use crate::plan::Step;
use crate::{Rollouts, StepError};

impl Rollouts {
    /// Publishes the commands of `steps`, in order, each in its own span.
    pub(crate) async fn send(
        &self,
        name: &str,
        generation: u64,
        spec: Option<&ModelDeploymentSpec>,
        steps: Vec<Step>,
    ) -> Result<(), StepError> {
        for step in steps {
            let Some((kind, command)) = executor_command(name, generation, step, spec) else {
                continue;
            };
            let (cluster, replica) = (command.cluster.clone(), replica_of(&command).to_string());
            let span = tracing::info_span!(
                "rollout_command",
                deployment = name,
                generation,
                cluster = %cluster,
                replica = %replica,
                action = kind.as_str(),
            );
            let failed = |source: KitError| StepError::Send {
                action: kind.as_str(),
                replica: replica.clone(),
                cluster: cluster.clone(),
                source,
            };
            async {
                let subject = self
                    .bus
                    .subjects
                    .command(&cluster, kind)
                    .map_err(|e| failed(e.into()))?;
                self.bus
                    .publish(subject, &command, Some(&command.command_id))
                    .await
                    .map_err(failed)?;
                tracing::debug!("{}", kind.as_str());
                Ok::<(), StepError>(())
            }
            .instrument(span)
            .await?;
        }
        Ok(())
    }
}

/// The executor command for one planned step; `None` for a start without
/// a spec to start (a deleted deployment starts nothing).
fn executor_command(
    name: &str,
    generation: u64,
    step: Step,
    spec: Option<&ModelDeploymentSpec>,
) -> Option<(CommandAction, v1::ExecutorCommand)> {
    let (cluster, command_id, action, kind) = match step {
        Step::Start {
            cluster,
            replica_id,
            command_id,
        } => {
            let spec = spec?;
            let model = spec.model.as_ref()?;
            let (model_name, digest) = match &model.artifact {
                Some(a) => (a.name.clone(), a.digest.clone()),
                None => (model.preset.clone(), String::new()),
            };
            let placement_spec = spec.placement.clone().unwrap_or_default();
            let action = Action::Start(v1::StartReplica {
                replica_id,
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
            (cluster, command_id, action, CommandAction::Start)
        }
        Step::Stop {
            cluster,
            replica_id,
            command_id,
            reason,
        } => {
            let action = Action::Stop(v1::StopReplica { replica_id, reason });
            (cluster, command_id, action, CommandAction::Stop)
        }
    };
    Some((
        kind,
        v1::ExecutorCommand {
            command_id,
            cluster,
            deployment: name.to_string(),
            generation,
            action: Some(action),
        },
    ))
}

fn replica_of(command: &v1::ExecutorCommand) -> &str {
    match &command.action {
        Some(Action::Start(s)) => &s.replica_id,
        Some(Action::Stop(s)) => &s.replica_id,
        // The rollout sends no other action.
        _ => "",
    }
}
