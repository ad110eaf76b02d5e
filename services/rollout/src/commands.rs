//! Planned steps into executor commands, and their sending.

use flotilla_kit::KitError;
use flotilla_proto::CommandAction;
use flotilla_proto::v1::{self, ModelDeploymentSpec, PlacementDecision, executor_command::Action};
use tracing::Instrument;

use std::collections::HashMap;

use tokio::time::Instant;

use crate::plan::Step;
use crate::{RESEND_AFTER, Rollouts, StepError};

impl Rollouts {
    /// Publishes the commands of `steps`, each in its own span: sent in
    /// order, their acknowledgements awaited together (a stage's starts
    /// cost one round trip, not one each). `desired` is the spec and
    /// placement's decision for it, what a start is made of; `None` for a
    /// deleted deployment, which only stops.
    pub(crate) async fn send(
        &self,
        name: &str,
        generation: u64,
        desired: Option<(&ModelDeploymentSpec, &PlacementDecision)>,
        steps: Vec<Step>,
        sent: &mut HashMap<String, Instant>,
    ) -> Result<(), StepError> {
        let mut publishing = Vec::new();
        for step in steps {
            let Some((kind, command)) = executor_command(name, generation, step, desired) else {
                continue;
            };
            // A step plans every command its state still needs, round
            // after round; each goes once (again after RESEND_AFTER).
            if sent
                .get(&command.command_id)
                .is_some_and(|at| at.elapsed() < RESEND_AFTER)
            {
                continue;
            }
            let (cluster, replica) = (command.cluster.clone(), replica_of(&command).to_string());
            let span = tracing::info_span!(
                "rollout_command",
                deployment = name,
                generation,
                cluster = %cluster,
                replica = %replica,
                action = kind.as_str(),
            );
            let failed = move |source: KitError| StepError::Send {
                action: kind.as_str(),
                replica,
                cluster: cluster.clone(),
                source,
            };
            let subject = match self.bus.subjects.command(&command.cluster, kind) {
                Ok(subject) => subject,
                Err(e) => return Err(failed(e.into())),
            };
            publishing.push(
                async move {
                    let published = self
                        .bus
                        .publish(subject, &command, Some(&command.command_id))
                        .await;
                    if published.is_ok() {
                        tracing::debug!("{}", kind.as_str());
                    }
                    (command.command_id, published.map_err(failed))
                }
                .instrument(span),
            );
        }
        let mut first_error = None;
        for (command_id, published) in futures::future::join_all(publishing).await {
            match published {
                Ok(()) => {
                    sent.insert(command_id, Instant::now());
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The executor command for one planned step; `None` for a start without
/// a spec to start (a deleted deployment starts nothing).
///
/// A start carries placement's sizing for its cluster (GPUs per replica,
/// tensor and pipeline parallel, GPU model) from the decision's
/// assignment there, and the spec's engine and drift policy. Without an
/// assignment for the cluster (none is planned so, but a decision and a
/// step may disagree) the spec's own GPU request goes as it is and the
/// executor sizes nothing more.
fn executor_command(
    name: &str,
    generation: u64,
    step: Step,
    desired: Option<(&ModelDeploymentSpec, &PlacementDecision)>,
) -> Option<(CommandAction, v1::ExecutorCommand)> {
    let (cluster, command_id, action, kind) = match step {
        Step::Start {
            cluster,
            replica_id,
            command_id,
            replaces_updated_at_unix_ms,
        } => {
            let (spec, placement) = desired?;
            let model = spec.model.as_ref()?;
            let (model_name, digest) = match &model.artifact {
                Some(a) => (a.name.clone(), a.digest.clone()),
                None => (model.preset.clone(), String::new()),
            };
            let placement_spec = spec.placement.clone().unwrap_or_default();
            let mut gpu = spec.resources.as_ref().and_then(|r| r.gpu.clone());
            let assignment = placement
                .assignments
                .iter()
                .find(|a| a.cluster == cluster && a.gpus_per_replica > 0);
            let mut start = v1::StartReplica {
                replica_id,
                model: Some(v1::ModelRef {
                    name: model_name,
                    digest,
                    ..Default::default()
                }),
                runtime: spec.runtime,
                tolerations: placement_spec.tolerations,
                engine: spec.engine.clone(),
                drift_policy: spec.drift_policy,
                replaces_updated_at_unix_ms,
                ..Default::default()
            };
            if let Some(a) = assignment {
                gpu.get_or_insert_with(Default::default).count = a.gpus_per_replica;
                start.tensor_parallel = a.tensor_parallel.max(1);
                start.pipeline_parallel = a.pipeline_parallel.max(1);
                start.gpu_model = a.gpu_model.clone();
            }
            start.gpu = gpu;
            (
                cluster,
                command_id,
                Action::Start(start),
                CommandAction::Start,
            )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelDeploymentSpec {
        let json = r#"{"spec": {"model": {"preset": "llama-3.1-70b-instruct"}, "runtime": "vllm",
            "resources": {"gpu": {"minMemoryGiB": 20, "types": ["L4"]}},
            "placement": {"tolerations": [{"key": "spot", "operator": "Exists"}]},
            "engine": {"image": "vllm/vllm-openai:v0.8.5", "maxModelLen": 8192,
                "secretEnv": [{"name": "HF_TOKEN", "secret": "hf", "key": "token"}]},
            "driftPolicy": "ReportOnly"}}"#;
        let doc: v1::ModelDeployment = flotilla_proto::codec::decode_json(json.as_bytes()).unwrap();
        doc.spec.unwrap()
    }

    fn placement() -> PlacementDecision {
        PlacementDecision {
            deployment: "llama".into(),
            assignments: vec![
                v1::ClusterAssignment {
                    cluster: "gke-l4".into(),
                    replicas: 1,
                    gpus_per_replica: 8,
                    gpu_model: "L4-24GB".into(),
                    tensor_parallel: 4,
                    pipeline_parallel: 2,
                    ..Default::default()
                },
                v1::ClusterAssignment {
                    cluster: "h100".into(),
                    replicas: 1,
                    gpus_per_replica: 4,
                    gpu_model: "H100-80GB".into(),
                    tensor_parallel: 4,
                    // Written before pipeline stages existed.
                    pipeline_parallel: 0,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn start_on(cluster: &str, spec: &ModelDeploymentSpec) -> v1::StartReplica {
        let step = Step::Start {
            cluster: cluster.into(),
            replica_id: "llama-0".into(),
            command_id: "llama-0-start-1".into(),
            replaces_updated_at_unix_ms: 5,
        };
        let (kind, command) =
            executor_command("llama", 3, step, Some((spec, &placement()))).unwrap();
        assert_eq!(kind, CommandAction::Start);
        assert_eq!(command.cluster, cluster);
        assert_eq!(command.generation, 3);
        match command.action {
            Some(Action::Start(start)) => start,
            other => panic!("not a start: {other:?}"),
        }
    }

    #[test]
    fn a_start_carries_placements_sizing_for_its_cluster() {
        let spec = spec();
        let start = start_on("gke-l4", &spec);
        let gpu = start.gpu.as_ref().unwrap();
        assert_eq!(gpu.count, 8, "gpus_per_replica of the assignment");
        assert_eq!(gpu.min_memory_gib, 20, "the spec's own GPU request is kept");
        assert_eq!(gpu.types, ["L4"]);
        assert_eq!((start.tensor_parallel, start.pipeline_parallel), (4, 2));
        assert_eq!(start.gpu_model, "L4-24GB");
        assert_eq!(start.replaces_updated_at_unix_ms, 5, "the life it replaces");

        let start = start_on("h100", &spec);
        assert_eq!(start.gpu.as_ref().unwrap().count, 4);
        assert_eq!((start.tensor_parallel, start.pipeline_parallel), (4, 1));
        assert_eq!(start.gpu_model, "H100-80GB");
    }

    #[test]
    fn a_start_carries_the_engine_and_the_drift_policy() {
        let spec = spec();
        let start = start_on("gke-l4", &spec);
        assert_eq!(start.engine, spec.engine);
        assert_eq!(
            start.engine.as_ref().unwrap().secret_env[0].name,
            "HF_TOKEN"
        );
        assert_eq!(start.drift_policy(), v1::DriftPolicy::ReportOnly);
        assert_eq!(start.runtime(), v1::Runtime::Vllm);
        assert_eq!(start.tolerations[0].key, "spot");
        assert_eq!(start.model.as_ref().unwrap().name, "llama-3.1-70b-instruct");
    }

    #[test]
    fn without_an_assignment_the_spec_goes_as_it_is() {
        let mut spec = spec();
        spec.engine = None;
        spec.drift_policy = 0;
        let start = start_on("elsewhere", &spec);
        let gpu = start.gpu.as_ref().unwrap();
        assert_eq!(gpu.count, 0);
        assert_eq!(gpu.min_memory_gib, 20);
        assert_eq!((start.tensor_parallel, start.pipeline_parallel), (0, 0));
        assert!(start.gpu_model.is_empty());
        assert_eq!(start.engine, None);
        assert_eq!(start.drift_policy(), v1::DriftPolicy::Unspecified);
    }

    #[test]
    fn a_deleted_deployment_starts_nothing_and_stops_without_a_spec() {
        let start = Step::Start {
            cluster: "gke-l4".into(),
            replica_id: "llama-0".into(),
            command_id: "c".into(),
            replaces_updated_at_unix_ms: 0,
        };
        assert_eq!(executor_command("llama", 4, start, None), None);
        let stop = Step::Stop {
            cluster: "gke-l4".into(),
            replica_id: "llama-0".into(),
            command_id: "c".into(),
            reason: "deleted".into(),
        };
        let (kind, command) = executor_command("llama", 4, stop, None).unwrap();
        assert_eq!(kind, CommandAction::Stop);
        assert_eq!(replica_of(&command), "llama-0");
    }
}
