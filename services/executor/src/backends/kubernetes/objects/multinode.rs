//! Replicas that span nodes: one LeaderWorkerSet
//! (`leaderworkerset.x-k8s.io/v1`, the LWS controller must be installed)
//! of one group of `pipeline_parallel` pods, each holding one pipeline
//! stage's `tensor_parallel` GPUs.
//!
//! As in vLLM's and KAITO's LWS examples, the pods form a Ray cluster:
//! the leader starts the Ray head, waits until every worker joined, then
//! runs `vllm serve` with `--distributed-executor-backend ray`; each
//! worker runs `ray start --address=$(LWS_LEADER_ADDRESS):6379 --block`
//! (the LWS controller sets `LWS_LEADER_ADDRESS` and `LWS_GROUP_SIZE` in
//! every pod). Only the leader serves, so only it has the port and the
//! readiness probe; pods carry [`LABEL_ROLE`] beside the replica's labels
//! so the backend can tell them apart. The group is re-created as a whole
//! when one of its pods restarts (a stage alone cannot rejoin vLLM).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject};
use kube::core::TypeMeta;
use serde_json::json;

use super::{Engine, KubernetesConfig, labels, metadata, pod_spec, vllm_args};
use crate::backends::{BackendError, ReplicaSpec};
use flotilla_proto::v1;

pub const LWS_API_VERSION: &str = "leaderworkerset.x-k8s.io/v1";
pub const LWS_KIND: &str = "LeaderWorkerSet";
/// `leader` or `worker` on the pods of a multi-node replica.
pub const LABEL_ROLE: &str = "flotilla.dev/role";
pub const ROLE_LEADER: &str = "leader";
pub const ROLE_WORKER: &str = "worker";
/// The Ray head's port on the leader.
const RAY_PORT: u16 = 6379;

/// What object a replica needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// One node: [`deployment_object`](super::deployment_object).
    Deployment,
    /// Several nodes: [`lws_object`].
    LeaderWorkerSet,
}

/// The object `spec` needs: a LeaderWorkerSet when it spans nodes
/// (`pipeline_parallel` > 1), else a Deployment. A candle replica cannot
/// span nodes and is refused.
pub fn object_kind(spec: &ReplicaSpec) -> Result<ObjectKind, BackendError> {
    if spec.pipeline_parallel <= 1 {
        return Ok(ObjectKind::Deployment);
    }
    if spec.runtime != v1::Runtime::Vllm {
        return Err(BackendError::Failed(format!(
            "replica {} is sized for {} pipeline stages on as many nodes, and runtime candle \
             runs on one node only; use runtime vllm for a model that needs more than one node",
            spec.replica_id, spec.pipeline_parallel
        )));
    }
    Ok(ObjectKind::LeaderWorkerSet)
}

/// The API resource of LeaderWorkerSets, for a `kube::Api<DynamicObject>`.
pub fn lws_resource() -> ApiResource {
    ApiResource {
        group: "leaderworkerset.x-k8s.io".into(),
        version: "v1".into(),
        api_version: LWS_API_VERSION.into(),
        kind: LWS_KIND.into(),
        plural: "leaderworkersets".into(),
    }
}

/// A word for `sh`: as it is when it cannot be misread, else in single
/// quotes.
fn sh_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The leader's script: the Ray head, a wait until the whole group has
/// joined (vLLM places every stage at start and fails on a short
/// cluster), then `vllm serve` in its place.
fn leader_script(spec: &ReplicaSpec) -> String {
    let serve: Vec<String> = ["vllm", "serve"]
        .into_iter()
        .map(String::from)
        .chain(vllm_args(spec, Some("ray")))
        .map(|w| sh_quote(&w))
        .collect();
    format!(
        "set -e\n\
         ray start --head --port={RAY_PORT}\n\
         python3 -c 'import os, time, ray\n\
         ray.init(address=\"auto\", logging_level=\"ERROR\")\n\
         while len([n for n in ray.nodes() if n[\"Alive\"]]) < int(os.environ[\"LWS_GROUP_SIZE\"]):\n    time.sleep(2)'\n\
         exec {}\n",
        serve.join(" ")
    )
}

/// The LeaderWorkerSet that runs `spec` across `pipeline_parallel`
/// nodes; refused as [`object_kind`] refuses. Create it through
/// `kube::Api::<DynamicObject>::namespaced_with(client, ns,
/// &lws_resource())`.
pub fn lws_object(
    config: &KubernetesConfig,
    spec: &ReplicaSpec,
) -> Result<DynamicObject, BackendError> {
    if object_kind(spec)? != ObjectKind::LeaderWorkerSet {
        return Err(BackendError::Failed(format!(
            "replica {} fits on one node (pipeline_parallel {}): it is a Deployment, not a \
             LeaderWorkerSet",
            spec.replica_id, spec.pipeline_parallel
        )));
    }
    let template = |role: &str, engine: Engine| {
        let mut labels = labels(config, spec);
        labels.insert(LABEL_ROLE.into(), role.into());
        json!({
            "metadata": ObjectMeta { labels: Some(labels), ..Default::default() },
            "spec": pod_spec(config, spec, engine),
        })
    };
    let leader = template(
        ROLE_LEADER,
        Engine {
            command: vec!["/bin/sh".into(), "-c".into(), leader_script(spec)],
            args: None,
            serves: true,
        },
    );
    let worker = template(
        ROLE_WORKER,
        Engine {
            command: vec![
                "ray".into(),
                "start".into(),
                format!("--address=$(LWS_LEADER_ADDRESS):{RAY_PORT}"),
                "--block".into(),
            ],
            args: None,
            serves: false,
        },
    );
    let lws_spec = json!({
        "replicas": 1,
        // Workers start with the leader, which waits for them: a leader
        // that had to be ready first would wait forever.
        "startupPolicy": "LeaderCreated",
        "leaderWorkerTemplate": {
            "size": spec.pipeline_parallel,
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": leader,
            "workerTemplate": worker,
        },
    });
    Ok(DynamicObject {
        types: Some(TypeMeta {
            api_version: LWS_API_VERSION.into(),
            kind: LWS_KIND.into(),
        }),
        metadata: metadata(config, spec, &lws_spec),
        data: json!({ "spec": lws_spec }),
    })
}

#[cfg(test)]
pub(in crate::backends::kubernetes) mod tests {
    use serde_json::{Value, json};

    use super::super::tests::{config, engine_spec, labels_json, node_cache, spec};
    use super::*;

    /// 16 GPUs as two pipeline stages of eight.
    pub(in crate::backends::kubernetes) fn multi_node() -> ReplicaSpec {
        ReplicaSpec {
            gpus: 16,
            tensor_parallel: 8,
            pipeline_parallel: 2,
            ..engine_spec()
        }
    }

    fn labels_with(role: &str) -> Value {
        let mut labels = labels_json("vllm");
        labels["flotilla.dev/role"] = json!(role);
        labels
    }

    #[test]
    fn a_replica_spans_nodes_only_with_vllm() {
        assert_eq!(
            object_kind(&spec(v1::Runtime::Candle)).unwrap(),
            ObjectKind::Deployment
        );
        assert_eq!(
            object_kind(&multi_node()).unwrap(),
            ObjectKind::LeaderWorkerSet
        );
        let mut candle = multi_node();
        candle.runtime = v1::Runtime::Candle;
        let refused = object_kind(&candle).unwrap_err().to_string();
        assert!(
            refused.contains("runtime candle runs on one node only"),
            "{refused}"
        );
        assert!(lws_object(&config(), &candle).is_err());
        assert!(lws_object(&config(), &engine_spec()).is_err());
    }

    #[test]
    fn a_multi_node_replica_is_exactly_this_leader_worker_set() {
        let config = KubernetesConfig {
            model_delivery: node_cache(),
            ..config()
        };
        let sent = serde_json::to_value(lws_object(&config, &multi_node()).unwrap()).unwrap();
        let pod_of = |role: &str| &sent["spec"]["leaderWorkerTemplate"][format!("{role}Template")];
        // Every pod: the model fetched into the node cache, 8 GPUs, 8Gi
        // of /dev/shm, the engine's environment and node selection.
        for role in ["leader", "worker"] {
            let template = pod_of(role);
            assert_eq!(template["metadata"]["labels"], labels_with(role), "{role}");
            let pod = &template["spec"];
            assert_eq!(pod["initContainers"][0]["name"], "fetch-model", "{role}");
            assert_eq!(
                pod["volumes"],
                json!([
                    {"name": "models", "hostPath": {"path": "/var/lib/flotilla/models", "type": "DirectoryOrCreate"}},
                    {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
                ]),
                "{role}"
            );
            let container = &pod["containers"][0];
            assert_eq!(container["image"], "vllm/vllm-openai:v0.12.0", "{role}");
            assert_eq!(
                container["resources"]["limits"]["nvidia.com/gpu"], "8",
                "{role}"
            );
            assert_eq!(container["env"].as_array().unwrap().len(), 4, "{role}");
            assert_eq!(
                pod["nodeSelector"],
                json!({"gpu.type": "H100", "pool": "inference"})
            );
            assert_eq!(pod["tolerations"].as_array().unwrap().len(), 3);
            assert_eq!(pod["priorityClassName"], "inference-high");
        }
        let leader = &pod_of("leader")["spec"]["containers"][0];
        assert_eq!(
            leader["command"],
            json!([
                "/bin/sh",
                "-c",
                "set -e\n\
ray start --head --port=6379\n\
python3 -c 'import os, time, ray\n\
ray.init(address=\"auto\", logging_level=\"ERROR\")\n\
while len([n for n in ray.nodes() if n[\"Alive\"]]) < int(os.environ[\"LWS_GROUP_SIZE\"]):\n    time.sleep(2)'\n\
exec vllm serve /models/sha256-ab/model.gguf --served-model-name smollm2 --host 0.0.0.0 --port 8000 \
--tensor-parallel-size 8 --pipeline-parallel-size 2 --distributed-executor-backend ray \
--max-model-len 8192 --gpu-memory-utilization 0.9 --quantization fp8 --enable-prefix-caching\n"
            ])
        );
        assert_eq!(leader.get("args"), None);
        assert_eq!(
            leader["ports"],
            json!([{"name": "http", "containerPort": 8000}])
        );
        assert_eq!(
            leader["readinessProbe"]["httpGet"],
            json!({"path": "/health", "port": 8000})
        );
        let worker = &pod_of("worker")["spec"]["containers"][0];
        assert_eq!(
            worker["command"],
            json!([
                "ray",
                "start",
                "--address=$(LWS_LEADER_ADDRESS):6379",
                "--block"
            ])
        );
        assert_eq!(worker.get("ports"), None);
        assert_eq!(worker.get("readinessProbe"), None);
        // The object around the templates.
        let mut rest = sent.clone();
        for role in ["leaderTemplate", "workerTemplate"] {
            rest["spec"]["leaderWorkerTemplate"]
                .as_object_mut()
                .unwrap()
                .remove(role);
        }
        let labels = labels_json("vllm");
        assert_eq!(
            rest,
            json!({
                "apiVersion": "leaderworkerset.x-k8s.io/v1",
                "kind": "LeaderWorkerSet",
                "metadata": {
                    "name": "flotilla-chat-g3-0",
                    "namespace": "flotilla",
                    "labels": labels,
                    "annotations": {
                        "flotilla.dev/model": "smollm2",
                        "flotilla.dev/spec-hash": super::super::spec_hash(&sent["spec"]),
                        "flotilla.dev/drift-policy": "TakeOver",
                    },
                },
                "spec": {
                    "replicas": 1,
                    "startupPolicy": "LeaderCreated",
                    "leaderWorkerTemplate": {
                        "size": 2,
                        "restartPolicy": "RecreateGroupOnPodRestart",
                    },
                },
            })
        );
    }

    #[test]
    fn odd_engine_arguments_reach_vllm_as_one_word_each() {
        let mut odd = multi_node();
        odd.engine.extra_args = vec![
            "--override-generation-config".into(),
            r#"{"temperature": 0.5}"#.into(),
            "it's".into(),
        ];
        let script = leader_script(&odd);
        assert!(
            script.ends_with(
                r#"--override-generation-config '{"temperature": 0.5}' 'it'\''s'
"#
            ),
            "{script}"
        );
    }
}
