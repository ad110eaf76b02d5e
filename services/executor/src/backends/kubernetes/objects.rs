//! The objects the Kubernetes backend sends: one `apps/v1` Deployment per
//! replica (see [`deployment_object`]), and the labels that tie every
//! object to its cluster, deployment, replica and generation.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use flotilla_proto::v1::{self, TaintEffect, TolerationOperator};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::backends::ReplicaSpec;

/// The port every replica container serves on.
pub const PORT: i32 = 8000;
/// Where the model cache volume is mounted in a replica pod.
pub const MODELS_MOUNT: &str = "/models";

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "flotilla-executor";
pub const LABEL_CLUSTER: &str = "flotilla.dev/cluster";
pub const LABEL_DEPLOYMENT: &str = "flotilla.dev/deployment";
pub const LABEL_REPLICA: &str = "flotilla.dev/replica";
pub const LABEL_GENERATION: &str = "flotilla.dev/generation";
pub const LABEL_RUNTIME: &str = "flotilla.dev/runtime";
pub const ANNOTATION_MODEL: &str = "flotilla.dev/model";

/// Settings of the Kubernetes backend.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// This executor's cluster (a label on everything it creates).
    pub cluster: String,
    pub namespace: String,
    pub runner_image: String,
    pub vllm_image: String,
    /// The PersistentVolumeClaim holding the model cache.
    pub model_pvc: String,
    /// How long a new replica may take to become ready (image pull, model
    /// load).
    pub ready_timeout: Duration,
    /// How often pod status is read while waiting and observing.
    pub poll_interval: Duration,
}

/// The Deployment's name for a replica.
pub fn object_name(replica_id: &str) -> String {
    format!("flotilla-{replica_id}")
}

fn labels(config: &KubernetesConfig, spec: &ReplicaSpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.into(), MANAGED_BY.into()),
        (LABEL_CLUSTER.into(), config.cluster.clone()),
        (LABEL_DEPLOYMENT.into(), spec.deployment.clone()),
        (LABEL_REPLICA.into(), spec.replica_id.clone()),
        (LABEL_GENERATION.into(), spec.generation.to_string()),
        (
            LABEL_RUNTIME.into(),
            match spec.runtime {
                v1::Runtime::Vllm => "vllm",
                _ => "candle",
            }
            .into(),
        ),
    ])
}

fn toleration(t: &v1::Toleration) -> Toleration {
    let operator = match t.operator() {
        TolerationOperator::Exists => Some("Exists".to_string()),
        TolerationOperator::Equal => Some("Equal".to_string()),
        TolerationOperator::Unspecified => None,
    };
    let effect = match t.effect() {
        TaintEffect::NoSchedule => Some("NoSchedule".to_string()),
        TaintEffect::PreferNoSchedule => Some("PreferNoSchedule".to_string()),
        TaintEffect::NoExecute => Some("NoExecute".to_string()),
        TaintEffect::Unspecified => None,
    };
    Toleration {
        key: (!t.key.is_empty()).then(|| t.key.clone()),
        operator,
        value: (!t.value.is_empty()).then(|| t.value.clone()),
        effect,
        toleration_seconds: None,
    }
}

/// The Deployment that runs `spec`: what the backend sends to the API
/// server.
pub fn deployment_object(config: &KubernetesConfig, spec: &ReplicaSpec) -> Deployment {
    let labels = labels(config, spec);
    let model = Path::new(MODELS_MOUNT)
        .join(&spec.model_in_cache)
        .display()
        .to_string();
    let (image, command, args) = match spec.runtime {
        v1::Runtime::Vllm => (
            config.vllm_image.clone(),
            vec!["vllm".to_string(), "serve".to_string()],
            vec![
                model,
                "--served-model-name".into(),
                spec.model_name.clone(),
                "--host".into(),
                "0.0.0.0".into(),
                "--port".into(),
                PORT.to_string(),
            ],
        ),
        _ => (
            config.runner_image.clone(),
            vec!["flotilla-runner".to_string()],
            vec![
                "--model".into(),
                model,
                "--served-model-name".into(),
                spec.model_name.clone(),
                "--addr".into(),
                format!("0.0.0.0:{PORT}"),
            ],
        ),
    };
    let gpu_limits = (spec.gpus > 0).then(|| {
        BTreeMap::from([(
            "nvidia.com/gpu".to_string(),
            Quantity(spec.gpus.to_string()),
        )])
    });
    let mut volume_mounts = vec![VolumeMount {
        name: "models".into(),
        mount_path: MODELS_MOUNT.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    let mut volumes = vec![Volume {
        name: "models".into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: config.model_pvc.clone(),
            read_only: Some(true),
        }),
        ..Default::default()
    }];
    if spec.runtime == v1::Runtime::Vllm {
        // vLLM's workers share tensors through /dev/shm; the container
        // default of 64 MiB is far too small.
        volume_mounts.push(VolumeMount {
            name: "shm".into(),
            mount_path: "/dev/shm".into(),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "shm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let container = Container {
        name: "replica".into(),
        image: Some(image),
        command: Some(command),
        args: Some(args),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: PORT,
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/health".into()),
                port: IntOrString::Int(PORT),
                ..Default::default()
            }),
            period_seconds: Some(5),
            timeout_seconds: Some(2),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: gpu_limits.map(|limits| ResourceRequirements {
            limits: Some(limits),
            ..Default::default()
        }),
        volume_mounts: Some(volume_mounts),
        ..Default::default()
    };
    Deployment {
        metadata: ObjectMeta {
            name: Some(object_name(&spec.replica_id)),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels.clone()),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_MODEL.to_string(),
                spec.model_name.clone(),
            )])),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            // One pod per replica holding GPUs: never two at once.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([
                    (LABEL_CLUSTER.to_string(), config.cluster.clone()),
                    (LABEL_REPLICA.to_string(), spec.replica_id.clone()),
                ])),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    node_selector: (!spec.node_selector.is_empty())
                        .then(|| spec.node_selector.clone()),
                    tolerations: (!spec.tolerations.is_empty())
                        .then(|| spec.tolerations.iter().map(toleration).collect()),
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// The replica an object of this executor belongs to (its label).
pub(super) fn replica_of(meta: &ObjectMeta) -> Option<&String> {
    meta.labels.as_ref()?.get(LABEL_REPLICA)
}

#[cfg(test)]
pub(super) mod tests {
    //! The objects sent, field by field.

    use serde_json::json;

    use super::*;

    pub(in crate::backends::kubernetes) fn config() -> KubernetesConfig {
        KubernetesConfig {
            cluster: "eu-1".into(),
            namespace: "flotilla".into(),
            runner_image: "flotilla-runner:test".into(),
            vllm_image: "vllm/vllm-openai:test".into(),
            model_pvc: "model-cache".into(),
            ready_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_millis(1),
        }
    }

    pub(in crate::backends::kubernetes) fn spec(runtime: v1::Runtime) -> ReplicaSpec {
        ReplicaSpec {
            replica_id: "chat-g3-0".into(),
            deployment: "chat".into(),
            generation: 3,
            model_name: "smollm2".into(),
            model_path: "/var/cache/flotilla/sha256-ab/model.gguf".into(),
            model_in_cache: "sha256-ab/model.gguf".into(),
            runtime,
            gpus: 2,
            tolerations: vec![
                v1::Toleration {
                    key: "nvidia.com/gpu".into(),
                    operator: TolerationOperator::Exists.into(),
                    value: String::new(),
                    effect: TaintEffect::NoSchedule.into(),
                },
                v1::Toleration {
                    key: "dedicated".into(),
                    operator: TolerationOperator::Equal.into(),
                    value: "inference".into(),
                    effect: TaintEffect::Unspecified.into(),
                },
            ],
            node_selector: BTreeMap::from([("gpu.type".to_string(), "H100".to_string())]),
            ..Default::default()
        }
    }

    #[test]
    fn a_candle_replica_is_exactly_this_deployment() {
        let sent =
            serde_json::to_value(deployment_object(&config(), &spec(v1::Runtime::Candle))).unwrap();
        let labels = json!({
            "app.kubernetes.io/managed-by": "flotilla-executor",
            "flotilla.dev/cluster": "eu-1",
            "flotilla.dev/deployment": "chat",
            "flotilla.dev/generation": "3",
            "flotilla.dev/replica": "chat-g3-0",
            "flotilla.dev/runtime": "candle",
        });
        let expected = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "flotilla-chat-g3-0",
                "namespace": "flotilla",
                "labels": labels,
                "annotations": {"flotilla.dev/model": "smollm2"},
            },
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": {"flotilla.dev/cluster": "eu-1", "flotilla.dev/replica": "chat-g3-0"}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [{
                            "name": "replica",
                            "image": "flotilla-runner:test",
                            "command": ["flotilla-runner"],
                            "args": ["--model", "/models/sha256-ab/model.gguf",
                                     "--served-model-name", "smollm2",
                                     "--addr", "0.0.0.0:8000"],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "readinessProbe": {
                                "httpGet": {"path": "/health", "port": 8000},
                                "periodSeconds": 5,
                                "timeoutSeconds": 2,
                                "failureThreshold": 3,
                            },
                            "resources": {"limits": {"nvidia.com/gpu": "2"}},
                            "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": true}],
                        }],
                        "nodeSelector": {"gpu.type": "H100"},
                        "tolerations": [
                            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                            {"key": "dedicated", "operator": "Equal", "value": "inference"},
                        ],
                        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "model-cache", "readOnly": true}}],
                    },
                },
            },
        });
        assert_eq!(sent, expected);
    }

    #[test]
    fn a_vllm_replica_runs_vllm_serve_from_the_vllm_image_with_the_same_probe() {
        let sent =
            serde_json::to_value(deployment_object(&config(), &spec(v1::Runtime::Vllm))).unwrap();
        let pod = &sent["spec"]["template"]["spec"];
        assert_eq!(
            pod["containers"][0],
            json!({
                "name": "replica",
                "image": "vllm/vllm-openai:test",
                "command": ["vllm", "serve"],
                "args": ["/models/sha256-ab/model.gguf", "--served-model-name", "smollm2",
                         "--host", "0.0.0.0", "--port", "8000"],
                "ports": [{"name": "http", "containerPort": 8000}],
                "readinessProbe": {
                    "httpGet": {"path": "/health", "port": 8000},
                    "periodSeconds": 5,
                    "timeoutSeconds": 2,
                    "failureThreshold": 3,
                },
                "resources": {"limits": {"nvidia.com/gpu": "2"}},
                "volumeMounts": [
                    {"name": "models", "mountPath": "/models", "readOnly": true},
                    {"name": "shm", "mountPath": "/dev/shm"},
                ],
            })
        );
        assert_eq!(
            pod["volumes"][1],
            json!({"name": "shm", "emptyDir": {"medium": "Memory"}})
        );
        assert_eq!(sent["metadata"]["labels"]["flotilla.dev/runtime"], "vllm");
    }

    #[test]
    fn a_replica_without_gpus_asks_for_none() {
        let mut cpu = spec(v1::Runtime::Candle);
        cpu.gpus = 0;
        cpu.tolerations.clear();
        cpu.node_selector.clear();
        let sent = serde_json::to_value(deployment_object(&config(), &cpu)).unwrap();
        let pod = &sent["spec"]["template"]["spec"];
        assert_eq!(pod["containers"][0].get("resources"), None);
        assert_eq!(pod.get("nodeSelector"), None);
        assert_eq!(pod.get("tolerations"), None);
    }
}
