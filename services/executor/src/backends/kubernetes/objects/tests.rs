//! The objects sent, field by field.

use serde_json::{Value, json};

use super::*;

pub(in crate::backends::kubernetes) fn config() -> KubernetesConfig {
    KubernetesConfig {
        cluster: "eu-1".into(),
        namespace: "flotilla".into(),
        runner_image: "flotilla-runner:test".into(),
        vllm_image: "vllm/vllm-openai:test".into(),
        model_delivery: ModelDelivery::Pvc {
            claim: "model-cache".into(),
        },
        owner_name: None,
        owner: None,
        ready_timeout: Duration::from_secs(5),
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

/// A vLLM replica with every engine setting: two GPUs on one node.
pub(in crate::backends::kubernetes) fn engine_spec() -> ReplicaSpec {
    ReplicaSpec {
        tensor_parallel: 2,
        pipeline_parallel: 1,
        model_digest: format!("sha256:{}", "ab".repeat(32)),
        engine: v1::EngineSpec {
            image: "vllm/vllm-openai:v0.12.0".into(),
            max_model_len: 8192,
            gpu_memory_utilization: 0.9,
            quantization: "fp8".into(),
            extra_args: vec!["--enable-prefix-caching".into()],
            env: BTreeMap::from([
                ("VLLM_LOGGING_LEVEL".to_string(), "DEBUG".to_string()),
                ("NCCL_DEBUG".to_string(), "INFO".to_string()),
            ]),
            secret_env: vec![
                v1::SecretEnv {
                    name: "HF_TOKEN".into(),
                    secret: "hf".into(),
                    key: "token".into(),
                },
                v1::SecretEnv {
                    name: "API_KEY".into(),
                    secret: "keys".into(),
                    key: "api".into(),
                },
            ],
            resources: Some(v1::ContainerResources {
                cpu_request: "8".into(),
                cpu_limit: String::new(),
                memory_request: "64Gi".into(),
                memory_limit: "96Gi".into(),
            }),
            shm_size: String::new(),
            node_selector: BTreeMap::from([
                ("pool".to_string(), "inference".to_string()),
                ("gpu.type".to_string(), "A100".to_string()),
            ]),
            tolerations: vec![
                v1::Toleration {
                    key: "spot".into(),
                    operator: TolerationOperator::Exists.into(),
                    value: String::new(),
                    effect: TaintEffect::NoExecute.into(),
                },
                // Also among the start command's: sent once.
                v1::Toleration {
                    key: "nvidia.com/gpu".into(),
                    operator: TolerationOperator::Exists.into(),
                    value: String::new(),
                    effect: TaintEffect::NoSchedule.into(),
                },
            ],
            priority_class_name: "inference-high".into(),
        },
        ..spec(v1::Runtime::Vllm)
    }
}

pub(in crate::backends::kubernetes) fn node_cache() -> ModelDelivery {
    ModelDelivery::NodeCache {
        host_path: DEFAULT_NODE_CACHE_DIR.into(),
        fetch_image: "flotilla-executor:test".into(),
        fetch_env: vec![
            EnvVar {
                name: "FLOTILLA_NATS_URL".into(),
                value: Some("nats://hub:4222".into()),
                value_from: None,
            },
            EnvVar {
                name: "FLOTILLA_NATS_PASSWORD".into(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: "nats-users".into(),
                        key: "executor-eu-1".into(),
                        optional: None,
                    }),
                    ..Default::default()
                }),
            },
        ],
        budget_bytes: 500 << 30,
    }
}

pub(in crate::backends::kubernetes) fn labels_json(runtime: &str) -> Value {
    json!({
        "app.kubernetes.io/managed-by": "flotilla-executor",
        "flotilla.dev/cluster": "eu-1",
        "flotilla.dev/deployment": "chat",
        "flotilla.dev/generation": "3",
        "flotilla.dev/replica": "chat-g3-0",
        "flotilla.dev/runtime": runtime,
    })
}

fn probe_json() -> Value {
    json!({
        "httpGet": {"path": "/health", "port": 8000},
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    })
}

#[test]
fn a_candle_replica_is_exactly_this_deployment() {
    let sent =
        serde_json::to_value(deployment_object(&config(), &spec(v1::Runtime::Candle))).unwrap();
    let labels = labels_json("candle");
    let hash = spec_hash(&sent["spec"]);
    let expected = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "flotilla-chat-g3-0",
            "namespace": "flotilla",
            "labels": labels,
            "annotations": {"flotilla.dev/model": "smollm2", "flotilla.dev/spec-hash": hash,
                            "flotilla.dev/drift-policy": "TakeOver"},
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
                        "readinessProbe": probe_json(),
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
            "readinessProbe": probe_json(),
            "resources": {"limits": {"nvidia.com/gpu": "2"}},
            "volumeMounts": [
                {"name": "models", "mountPath": "/models", "readOnly": true},
                {"name": "shm", "mountPath": "/dev/shm"},
            ],
        })
    );
    // Two GPUs in the pod: 1Gi of /dev/shm each.
    assert_eq!(
        pod["volumes"][1],
        json!({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
    );
    assert_eq!(sent["metadata"]["labels"]["flotilla.dev/runtime"], "vllm");
}

#[test]
fn a_vllm_replica_of_one_gpu_keeps_an_unsized_shm() {
    let mut one = spec(v1::Runtime::Vllm);
    one.gpus = 1;
    let sent = serde_json::to_value(deployment_object(&config(), &one)).unwrap();
    assert_eq!(
        sent["spec"]["template"]["spec"]["volumes"][1],
        json!({"name": "shm", "emptyDir": {"medium": "Memory"}})
    );
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
    assert_eq!(pod.get("initContainers"), None);
}

#[test]
fn the_engine_sets_image_arguments_environment_resources_and_node_selection() {
    let sent = serde_json::to_value(deployment_object(&config(), &engine_spec())).unwrap();
    let pod = &sent["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0],
        json!({
            "name": "replica",
            "image": "vllm/vllm-openai:v0.12.0",
            "command": ["vllm", "serve"],
            "args": ["/models/sha256-ab/model.gguf", "--served-model-name", "smollm2",
                     "--host", "0.0.0.0", "--port", "8000",
                     "--tensor-parallel-size", "2",
                     "--max-model-len", "8192",
                     "--gpu-memory-utilization", "0.9",
                     "--quantization", "fp8",
                     "--enable-prefix-caching"],
            "env": [
                {"name": "NCCL_DEBUG", "value": "INFO"},
                {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"},
                {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api"}}},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            ],
            "ports": [{"name": "http", "containerPort": 8000}],
            "readinessProbe": probe_json(),
            "resources": {
                "requests": {"cpu": "8", "memory": "64Gi"},
                "limits": {"memory": "96Gi", "nvidia.com/gpu": "2"},
            },
            "volumeMounts": [
                {"name": "models", "mountPath": "/models", "readOnly": true},
                {"name": "shm", "mountPath": "/dev/shm"},
            ],
        })
    );
    // Placement's gpu.type wins over the engine's.
    assert_eq!(
        pod["nodeSelector"],
        json!({"gpu.type": "H100", "pool": "inference"})
    );
    assert_eq!(
        pod["tolerations"],
        json!([
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "dedicated", "operator": "Equal", "value": "inference"},
            {"key": "spot", "operator": "Exists", "effect": "NoExecute"},
        ])
    );
    assert_eq!(pod["priorityClassName"], "inference-high");
    assert_eq!(
        pod["volumes"][1],
        json!({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
    );
}

#[test]
fn shm_size_is_the_engines_when_given_even_for_candle() {
    let mut vllm = engine_spec();
    vllm.engine.shm_size = "16Gi".into();
    let sent = serde_json::to_value(deployment_object(&config(), &vllm)).unwrap();
    assert_eq!(
        sent["spec"]["template"]["spec"]["volumes"][1],
        json!({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}})
    );
    let mut candle = spec(v1::Runtime::Candle);
    candle.engine.shm_size = "2Gi".into();
    candle.engine.extra_args = vec!["--kv-cache-budget".into(), "4GiB".into()];
    let sent = serde_json::to_value(deployment_object(&config(), &candle)).unwrap();
    let pod = &sent["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][1],
        json!({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
    );
    // The runner takes the extra arguments and nothing of vLLM's.
    assert_eq!(
        pod["containers"][0]["args"],
        json!([
            "--model",
            "/models/sha256-ab/model.gguf",
            "--served-model-name",
            "smollm2",
            "--addr",
            "0.0.0.0:8000",
            "--kv-cache-budget",
            "4GiB"
        ])
    );
}

#[test]
fn a_candle_replica_ignores_vllm_sizing_and_settings() {
    let mut candle = engine_spec();
    candle.runtime = v1::Runtime::Candle;
    candle.engine.image = String::new();
    candle.engine.extra_args.clear();
    let sent = serde_json::to_value(deployment_object(&config(), &candle)).unwrap();
    let container = &sent["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "flotilla-runner:test");
    assert_eq!(
        container["args"],
        json!([
            "--model",
            "/models/sha256-ab/model.gguf",
            "--served-model-name",
            "smollm2",
            "--addr",
            "0.0.0.0:8000"
        ])
    );
}

#[test]
fn every_object_is_owned_by_the_configured_owner() {
    let owner = OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: "flotilla-executor".into(),
        uid: "1f0c0a7e-0000-4000-8000-000000000001".into(),
        controller: Some(false),
        block_owner_deletion: Some(false),
    };
    let config = KubernetesConfig {
        owner: Some(owner),
        ..config()
    };
    let sent =
        serde_json::to_value(deployment_object(&config, &spec(v1::Runtime::Candle))).unwrap();
    assert_eq!(
        sent["metadata"]["ownerReferences"],
        json!([{
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "flotilla-executor",
            "uid": "1f0c0a7e-0000-4000-8000-000000000001",
            "controller": false,
            "blockOwnerDeletion": false,
        }])
    );
}

#[test]
fn node_cache_delivery_fetches_the_model_in_an_init_container() {
    let config = KubernetesConfig {
        model_delivery: node_cache(),
        ..config()
    };
    let sent = serde_json::to_value(deployment_object(&config, &engine_spec())).unwrap();
    let pod = &sent["spec"]["template"]["spec"];
    let digest = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(
        pod["initContainers"],
        json!([{
            "name": "fetch-model",
            "image": "flotilla-executor:test",
            "command": ["flotilla-executor", "fetch-model"],
            "args": ["--model", "smollm2", "--digest", digest,
                     "--cache-dir", "/cache", "--cache-budget", "536870912000"],
            "env": [
                {"name": "FLOTILLA_NATS_URL", "value": "nats://hub:4222"},
                {"name": "FLOTILLA_NATS_PASSWORD",
                 "valueFrom": {"secretKeyRef": {"name": "nats-users", "key": "executor-eu-1"}}},
            ],
            "volumeMounts": [{"name": "models", "mountPath": "/cache"}],
        }])
    );
    assert_eq!(
        pod["volumes"][0],
        json!({"name": "models", "hostPath": {"path": "/var/lib/flotilla/models", "type": "DirectoryOrCreate"}})
    );
    // The engine reads the same folder, read-only, at the same path.
    assert_eq!(
        pod["containers"][0]["volumeMounts"][0],
        json!({"name": "models", "mountPath": "/models", "readOnly": true})
    );
    assert_eq!(
        pod["containers"][0]["args"][0],
        "/models/sha256-ab/model.gguf"
    );
}

#[test]
fn the_spec_hash_follows_the_spec_and_only_the_spec() {
    let a = deployment_object(&config(), &spec(v1::Runtime::Vllm));
    let again = deployment_object(&config(), &spec(v1::Runtime::Vllm));
    let hash =
        |d: &Deployment| d.metadata.annotations.as_ref().unwrap()[ANNOTATION_SPEC_HASH].clone();
    assert_eq!(hash(&a), hash(&again));
    assert_eq!(hash(&a).len(), 16);
    let mut other = spec(v1::Runtime::Vllm);
    other.engine.image = "vllm/vllm-openai:other".into();
    assert_ne!(hash(&a), hash(&deployment_object(&config(), &other)));
    // An owner is metadata: the same spec.
    let owned = KubernetesConfig {
        owner: Some(OwnerReference::default()),
        ..config()
    };
    assert_eq!(
        hash(&a),
        hash(&deployment_object(&owned, &spec(v1::Runtime::Vllm)))
    );
    // FNV-1a's published values: the hash must not change with the build.
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
}

#[test]
fn pods_keep_to_the_gpu_type_placement_sized_them_for() {
    let mut on_h100 = engine_spec();
    on_h100.gpu_model = "H100-80GB".into();
    on_h100.gpu_products = vec!["NVIDIA-H100-80GB-HBM3".into(), "NVIDIA-H100-NVL".into()];
    let sent = serde_json::to_value(deployment_object(&config(), &on_h100)).unwrap();
    assert_eq!(
        sent["spec"]["template"]["spec"]["affinity"],
        json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{
                "key": "nvidia.com/gpu.product", "operator": "In",
                "values": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-NVL"]}]}]}}})
    );
    // The deployment's own selector on the product decides instead.
    let mut chosen = on_h100.clone();
    chosen.engine.node_selector =
        BTreeMap::from([(LABEL_GPU_PRODUCT.to_string(), "NVIDIA-H100-NVL".to_string())]);
    let sent = serde_json::to_value(deployment_object(&config(), &chosen)).unwrap();
    assert!(sent["spec"]["template"]["spec"].get("affinity").is_none());
    // No product known (no feature discovery labels): no constraint.
    let sent = serde_json::to_value(deployment_object(&config(), &engine_spec())).unwrap();
    assert!(sent["spec"]["template"]["spec"].get("affinity").is_none());
}
