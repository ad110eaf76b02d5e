//! The objects the Kubernetes backend sends, as pure functions of the
//! backend's settings and a replica's spec.
//!
//! A replica that fits on one node is one `apps/v1` Deployment of one pod
//! ([`deployment_object`]); one that spans nodes (`pipeline_parallel` > 1,
//! vLLM only) is one LeaderWorkerSet ([`multinode::lws_object`]);
//! [`multinode::object_kind`] says which. Both carry:
//!
//! - the labels that tie them to their cluster, deployment, replica and
//!   generation, on the object and on every pod;
//! - the engine: the deployment's `engine.image` or the runtime's image,
//!   `vllm serve` or `flotilla-runner` with the model at
//!   `/models/<model in cache>`, vLLM's sizing flags (tensor and pipeline
//!   parallel, `--max-model-len`, `--gpu-memory-utilization`,
//!   `--quantization`) and the engine's extra arguments, its environment
//!   (values sorted by name, then variables from Secrets), its CPU and
//!   memory, and `nvidia.com/gpu` for the GPUs of one pod;
//! - an in-memory `/dev/shm` for vLLM (sized by `engine.shm_size`, else
//!   1Gi per GPU when a pod holds more than one);
//! - node selection: the start command's node selector and tolerations
//!   with the engine's own, and its priority class;
//! - the model, by [`ModelDelivery`]: a ReadWriteMany claim holding the
//!   executor's cache, mounted read-only, or a node-local hostPath cache
//!   an init container (`flotilla-executor fetch-model`) fills from the
//!   hub's object store, shared by the replicas on that node and kept
//!   across restarts;
//! - the owner reference of `--kube-owner` (the executor's own
//!   Deployment), so deleting the release garbage-collects its replicas;
//! - the annotations of the model served and of the desired spec's hash
//!   ([`ANNOTATION_SPEC_HASH`]), which [`drift::drift`] reads back.

pub mod drift;
pub mod multinode;
pub mod owner;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use flotilla_proto::v1::{self, TaintEffect, TolerationOperator};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    HostPathVolumeSource, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SecretKeySelector, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::backends::ReplicaSpec;

/// What the backend module re-exports of the objects beyond the names it
/// lists itself.
pub mod reexports {
    pub use super::drift::{adopted_baseline, drift, drift_json, quantity_value};
    pub use super::multinode::{
        LABEL_ROLE, LWS_API_VERSION, LWS_KIND, ObjectKind, ROLE_LEADER, ROLE_WORKER, lws_object,
        lws_resource, object_kind,
    };
    pub use super::owner::{OwnerKind, owner_reference, parse_owner};
    pub use super::{
        ANNOTATION_DRIFT_POLICY, ANNOTATION_SPEC_HASH, DEFAULT_NODE_CACHE_DIR, FETCH_CACHE_MOUNT,
        ModelDelivery, drift_policy_name, drift_policy_of, gpus_per_pod, spec_hash,
    };
}

/// The port every replica container serves on.
pub const PORT: i32 = 8000;
/// Where the model cache volume is mounted in a replica pod.
pub const MODELS_MOUNT: &str = "/models";
/// Where the fetch-model init container mounts the node cache.
pub const FETCH_CACHE_MOUNT: &str = "/cache";
/// The node cache's folder on each node unless `--kube-node-cache-dir`
/// says otherwise.
pub const DEFAULT_NODE_CACHE_DIR: &str = "/var/lib/flotilla/models";

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "flotilla-executor";
pub const LABEL_CLUSTER: &str = "flotilla.dev/cluster";
pub const LABEL_DEPLOYMENT: &str = "flotilla.dev/deployment";
pub const LABEL_REPLICA: &str = "flotilla.dev/replica";
pub const LABEL_GENERATION: &str = "flotilla.dev/generation";
pub const LABEL_RUNTIME: &str = "flotilla.dev/runtime";
pub const ANNOTATION_MODEL: &str = "flotilla.dev/model";
/// The GPU product label NVIDIA's GPU feature discovery sets on nodes.
pub const LABEL_GPU_PRODUCT: &str = "nvidia.com/gpu.product";
/// Hash of the `spec` the executor sent ([`spec_hash`]): an object whose
/// annotation differs from the desired spec's hash was made from another
/// spec (an older executor's, or the annotation was edited), not merely
/// edited by hand.
pub const ANNOTATION_SPEC_HASH: &str = "flotilla.dev/spec-hash";
/// The deployment's drift policy (`TakeOver`, `ReportOnly`), so that an
/// executor that restarts and adopts the object keeps to it.
pub const ANNOTATION_DRIFT_POLICY: &str = "flotilla.dev/drift-policy";

/// The annotation's value for `policy`.
pub fn drift_policy_name(policy: v1::DriftPolicy) -> &'static str {
    match policy {
        v1::DriftPolicy::ReportOnly => "ReportOnly",
        v1::DriftPolicy::TakeOver | v1::DriftPolicy::Unspecified => "TakeOver",
    }
}

/// The policy an annotation names; take-over, the default, for anything
/// else.
pub fn drift_policy_of(name: Option<&str>) -> v1::DriftPolicy {
    match name {
        Some("ReportOnly") => v1::DriftPolicy::ReportOnly,
        _ => v1::DriftPolicy::TakeOver,
    }
}

/// How replica pods get their model.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelDelivery {
    /// A ReadWriteMany PersistentVolumeClaim holding the executor's own
    /// model cache, mounted read-only at `/models`.
    Pvc { claim: String },
    /// A hostPath folder on each node (`DirectoryOrCreate`) that an init
    /// container fills with `flotilla-executor fetch-model`, in the model
    /// cache's layout; the engine mounts it read-only at `/models`.
    /// Replicas on one node share it, and a restarted pod finds its model
    /// there.
    NodeCache {
        /// The folder on the node.
        host_path: String,
        /// The image of the init container: one holding
        /// `flotilla-executor` (the executor's own).
        fetch_image: String,
        /// How the init container reaches the bus: `FLOTILLA_NATS_URL`,
        /// the user, the password from a Secret, the subject prefix.
        fetch_env: Vec<EnvVar>,
        /// Most bytes of models the node cache keeps (`--cache-budget`);
        /// least recently used go first.
        budget_bytes: u64,
    },
}

/// Settings of the Kubernetes backend.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// This executor's cluster (a label on everything it creates).
    pub cluster: String,
    pub namespace: String,
    pub runner_image: String,
    pub vllm_image: String,
    /// How replica pods get their model.
    pub model_delivery: ModelDelivery,
    /// `--kube-owner` as given (`deployment/NAME`), until
    /// [`with_owner`](Self::with_owner) reads it into `owner`.
    pub owner_name: Option<String>,
    /// Set on every object: deleting the owner (the executor's own
    /// Deployment, when the release is uninstalled) deletes the replicas.
    pub owner: Option<OwnerReference>,
    /// How long a new replica may take to become ready (image pull, model
    /// load).
    pub ready_timeout: Duration,
}

impl KubernetesConfig {
    /// The same settings with `owner` read from the API server when
    /// `owner_name` names one (in `namespace`: an owner reference cannot
    /// cross namespaces).
    pub async fn with_owner(mut self, client: &kube::Client) -> Result<Self, kube::Error> {
        if let Some(name) = &self.owner_name {
            self.owner = Some(owner::owner_reference(client, &self.namespace, name).await?);
        }
        Ok(self)
    }
}

/// The object's name for a replica (Deployment or LeaderWorkerSet).
pub fn object_name(replica_id: &str) -> String {
    format!("flotilla-{replica_id}")
}

fn runtime_name(runtime: v1::Runtime) -> &'static str {
    match runtime {
        v1::Runtime::Vllm => "vllm",
        _ => "candle",
    }
}

fn labels(config: &KubernetesConfig, spec: &ReplicaSpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.into(), MANAGED_BY.into()),
        (LABEL_CLUSTER.into(), config.cluster.clone()),
        (LABEL_DEPLOYMENT.into(), spec.deployment.clone()),
        (LABEL_REPLICA.into(), spec.replica_id.clone()),
        (LABEL_GENERATION.into(), spec.generation.to_string()),
        (LABEL_RUNTIME.into(), runtime_name(spec.runtime).into()),
    ])
}

fn selector(config: &KubernetesConfig, spec: &ReplicaSpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_CLUSTER.to_string(), config.cluster.clone()),
        (LABEL_REPLICA.to_string(), spec.replica_id.clone()),
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

/// GPUs one pod of the replica holds: all of them on one node; a
/// stage's (`tensor_parallel`) when the replica spans nodes.
pub fn gpus_per_pod(spec: &ReplicaSpec) -> u32 {
    let stages = spec.pipeline_parallel.max(1);
    if stages == 1 {
        spec.gpus
    } else if spec.tensor_parallel > 0 {
        spec.tensor_parallel
    } else {
        spec.gpus.div_ceil(stages)
    }
}

/// FNV-1a, 64 bits: stable across Rust releases and executor builds, as
/// an annotation read back by a later executor must be.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The hash [`ANNOTATION_SPEC_HASH`] holds: of an object's `spec` as
/// JSON (k8s-openapi writes fields in a fixed order and maps sorted).
pub fn spec_hash(spec: &serde_json::Value) -> String {
    format!(
        "{:016x}",
        fnv1a64(&serde_json::to_vec(spec).unwrap_or_default())
    )
}

/// Metadata of a replica's object; `spec` is what the hash covers.
fn metadata(
    config: &KubernetesConfig,
    spec: &ReplicaSpec,
    object_spec: &serde_json::Value,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(object_name(&spec.replica_id)),
        namespace: Some(config.namespace.clone()),
        labels: Some(labels(config, spec)),
        annotations: Some(BTreeMap::from([
            (ANNOTATION_MODEL.to_string(), spec.model_name.clone()),
            (ANNOTATION_SPEC_HASH.to_string(), spec_hash(object_spec)),
            (
                ANNOTATION_DRIFT_POLICY.to_string(),
                drift_policy_name(spec.drift_policy).to_string(),
            ),
        ])),
        owner_references: config.owner.clone().map(|o| vec![o]),
        ..Default::default()
    }
}

/// The model's path as the engine container sees it.
fn model_path(spec: &ReplicaSpec) -> String {
    Path::new(MODELS_MOUNT)
        .join(&spec.model_in_cache)
        .display()
        .to_string()
}

/// `vllm serve`'s arguments after the command: the model, the names and
/// address it serves on, the sizing placement chose, the engine's
/// settings, then its extra arguments as given. `backend`: vLLM's
/// `--distributed-executor-backend` (`ray` across nodes).
fn vllm_args(spec: &ReplicaSpec, backend: Option<&str>) -> Vec<String> {
    let mut args = vec![
        model_path(spec),
        "--served-model-name".into(),
        spec.model_name.clone(),
        "--host".into(),
        "0.0.0.0".into(),
        "--port".into(),
        PORT.to_string(),
    ];
    let mut flag = |name: &str, value: String| {
        args.push(name.to_string());
        args.push(value);
    };
    // vLLM's own default for both is 1.
    if spec.tensor_parallel > 1 {
        flag("--tensor-parallel-size", spec.tensor_parallel.to_string());
    }
    if spec.pipeline_parallel > 1 {
        flag(
            "--pipeline-parallel-size",
            spec.pipeline_parallel.to_string(),
        );
    }
    if let Some(backend) = backend {
        flag("--distributed-executor-backend", backend.to_string());
    }
    let engine = &spec.engine;
    if engine.max_model_len > 0 {
        flag("--max-model-len", engine.max_model_len.to_string());
    }
    if engine.gpu_memory_utilization > 0.0 {
        flag(
            "--gpu-memory-utilization",
            engine.gpu_memory_utilization.to_string(),
        );
    }
    if !engine.quantization.is_empty() {
        flag("--quantization", engine.quantization.clone());
    }
    args.extend(engine.extra_args.iter().cloned());
    args
}

/// `flotilla-runner`'s arguments: it has no tensor parallelism nor vLLM's
/// settings, so only the engine's extra arguments are added.
fn runner_args(spec: &ReplicaSpec) -> Vec<String> {
    let mut args = vec![
        "--model".into(),
        model_path(spec),
        "--served-model-name".into(),
        spec.model_name.clone(),
        "--addr".into(),
        format!("0.0.0.0:{PORT}"),
    ];
    args.extend(spec.engine.extra_args.iter().cloned());
    args
}

/// The engine's image: the deployment's own, else the runtime's.
fn engine_image(config: &KubernetesConfig, spec: &ReplicaSpec) -> String {
    if !spec.engine.image.trim().is_empty() {
        spec.engine.image.clone()
    } else if spec.runtime == v1::Runtime::Vllm {
        config.vllm_image.clone()
    } else {
        config.runner_image.clone()
    }
}

/// The engine's environment: values by name (a map, so sorted), then the
/// variables taken from Secrets, by name.
fn engine_env(engine: &v1::EngineSpec) -> Option<Vec<EnvVar>> {
    let mut secret = engine.secret_env.clone();
    secret.sort_by(|a, b| a.name.cmp(&b.name));
    let env: Vec<EnvVar> = engine
        .env
        .iter()
        .map(|(name, value)| EnvVar {
            name: name.clone(),
            value: Some(value.clone()),
            value_from: None,
        })
        .chain(secret.into_iter().map(|s| EnvVar {
            name: s.name,
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: s.secret,
                    key: s.key,
                    optional: None,
                }),
                ..Default::default()
            }),
        }))
        .collect();
    (!env.is_empty()).then_some(env)
}

/// Requests and limits: the engine's CPU and memory, and `gpus` as
/// `nvidia.com/gpu` (a limit, which Kubernetes also takes as the
/// request).
fn engine_resources(engine: &v1::EngineSpec, gpus: u32) -> Option<ResourceRequirements> {
    let r = engine.resources.clone().unwrap_or_default();
    let pick = |pairs: [(&str, &String); 2]| {
        pairs
            .into_iter()
            .filter(|(_, q)| !q.trim().is_empty())
            .map(|(k, q)| (k.to_string(), Quantity(q.trim().to_string())))
            .collect::<BTreeMap<_, _>>()
    };
    let requests = pick([("cpu", &r.cpu_request), ("memory", &r.memory_request)]);
    let mut limits = pick([("cpu", &r.cpu_limit), ("memory", &r.memory_limit)]);
    if gpus > 0 {
        limits.insert("nvidia.com/gpu".into(), Quantity(gpus.to_string()));
    }
    (!requests.is_empty() || !limits.is_empty()).then(|| ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    })
}

/// The in-memory `/dev/shm` of a pod holding `gpus`: vLLM's workers
/// share tensors through it and a container's default of 64 MiB is far
/// too small. `engine.shm_size` sizes it (also for candle, which then
/// asks for one); otherwise 1Gi per GPU for more than one GPU, and no
/// limit of its own for one.
fn shm(spec: &ReplicaSpec, gpus: u32) -> Option<(Volume, VolumeMount)> {
    let size = spec.engine.shm_size.trim();
    if spec.runtime != v1::Runtime::Vllm && size.is_empty() {
        return None;
    }
    let size_limit = if !size.is_empty() {
        Some(Quantity(size.to_string()))
    } else if gpus > 1 {
        Some(Quantity(format!("{gpus}Gi")))
    } else {
        None
    };
    Some((
        Volume {
            name: "shm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit,
            }),
            ..Default::default()
        },
        VolumeMount {
            name: "shm".into(),
            mount_path: "/dev/shm".into(),
            ..Default::default()
        },
    ))
}

/// The model volume, its read-only mount in the engine container, and the
/// init container filling it (node cache).
fn model_volume(
    config: &KubernetesConfig,
    spec: &ReplicaSpec,
) -> (Volume, VolumeMount, Option<Container>) {
    let mount = VolumeMount {
        name: "models".into(),
        mount_path: MODELS_MOUNT.into(),
        read_only: Some(true),
        ..Default::default()
    };
    match &config.model_delivery {
        ModelDelivery::Pvc { claim } => (
            Volume {
                name: "models".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(true),
                }),
                ..Default::default()
            },
            mount,
            None,
        ),
        ModelDelivery::NodeCache {
            host_path,
            fetch_image,
            fetch_env,
            budget_bytes,
        } => (
            Volume {
                name: "models".into(),
                host_path: Some(HostPathVolumeSource {
                    path: host_path.clone(),
                    type_: Some("DirectoryOrCreate".into()),
                }),
                ..Default::default()
            },
            mount,
            Some(Container {
                name: "fetch-model".into(),
                image: Some(fetch_image.clone()),
                command: Some(vec!["flotilla-executor".into(), "fetch-model".into()]),
                args: Some(vec![
                    "--model".into(),
                    spec.model_name.clone(),
                    "--digest".into(),
                    spec.model_digest.clone(),
                    "--cache-dir".into(),
                    FETCH_CACHE_MOUNT.into(),
                    "--cache-budget".into(),
                    budget_bytes.to_string(),
                ]),
                env: (!fetch_env.is_empty()).then(|| fetch_env.clone()),
                volume_mounts: Some(vec![VolumeMount {
                    name: "models".into(),
                    mount_path: FETCH_CACHE_MOUNT.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        ),
    }
}

fn readiness_probe() -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/health".into()),
            port: IntOrString::Int(PORT),
            ..Default::default()
        }),
        period_seconds: Some(5),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

/// What a pod's engine container runs.
struct Engine {
    command: Vec<String>,
    args: Option<Vec<String>>,
    /// Only a pod that serves (not a pipeline stage's worker) has a port
    /// and a readiness probe.
    serves: bool,
}

/// One pod of the replica: the engine container running `engine`, its
/// model, `/dev/shm` and node selection. Every pod of a multi-node
/// replica is the same but for what its engine runs.
fn pod_spec(config: &KubernetesConfig, spec: &ReplicaSpec, engine: Engine) -> PodSpec {
    let gpus = gpus_per_pod(spec);
    let (model_volume, model_mount, init) = model_volume(config, spec);
    let mut volume_mounts = vec![model_mount];
    let mut volumes = vec![model_volume];
    if let Some((volume, mount)) = shm(spec, gpus) {
        volumes.push(volume);
        volume_mounts.push(mount);
    }
    let container = Container {
        name: "replica".into(),
        image: Some(engine_image(config, spec)),
        command: Some(engine.command),
        args: engine.args,
        env: engine_env(&spec.engine),
        ports: engine.serves.then(|| {
            vec![ContainerPort {
                name: Some("http".into()),
                container_port: PORT,
                ..Default::default()
            }]
        }),
        readiness_probe: engine.serves.then(readiness_probe),
        resources: engine_resources(&spec.engine, gpus),
        volume_mounts: Some(volume_mounts),
        ..Default::default()
    };
    // Placement's selector wins over the engine's on a shared key: it is
    // what the replica was sized for.
    let mut node_selector = spec.engine.node_selector.clone();
    node_selector.extend(spec.node_selector.clone());
    let mut tolerations: Vec<Toleration> = Vec::new();
    for t in spec.tolerations.iter().chain(&spec.engine.tolerations) {
        let t = toleration(t);
        if !tolerations.contains(&t) {
            tolerations.push(t);
        }
    }
    let priority_class = spec.engine.priority_class_name.trim();
    // On a cluster of several GPU types, the type placement sized the
    // replica for; a selector on the product already says which.
    let affinity = (!spec.gpu_products.is_empty()
        && !node_selector.contains_key(LABEL_GPU_PRODUCT))
    .then(|| Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: LABEL_GPU_PRODUCT.into(),
                        operator: "In".into(),
                        values: Some(spec.gpu_products.clone()),
                    }]),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    PodSpec {
        init_containers: init.map(|c| vec![c]),
        containers: vec![container],
        affinity,
        node_selector: (!node_selector.is_empty()).then_some(node_selector),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        priority_class_name: (!priority_class.is_empty()).then(|| priority_class.to_string()),
        volumes: Some(volumes),
        ..Default::default()
    }
}

/// The Deployment that runs `spec` on one node: what the backend sends
/// to the API server. (A replica of `pipeline_parallel` > 1 is a
/// LeaderWorkerSet instead: see [`multinode::object_kind`].)
pub fn deployment_object(config: &KubernetesConfig, spec: &ReplicaSpec) -> Deployment {
    let labels = labels(config, spec);
    let engine = match spec.runtime {
        v1::Runtime::Vllm => Engine {
            command: vec!["vllm".into(), "serve".into()],
            args: Some(vllm_args(spec, None)),
            serves: true,
        },
        _ => Engine {
            command: vec!["flotilla-runner".into()],
            args: Some(runner_args(spec)),
            serves: true,
        },
    };
    let deployment_spec = DeploymentSpec {
        replicas: Some(1),
        // One pod per replica holding GPUs: never two at once.
        strategy: Some(DeploymentStrategy {
            type_: Some("Recreate".into()),
            ..Default::default()
        }),
        selector: LabelSelector {
            match_labels: Some(selector(config, spec)),
            ..Default::default()
        },
        template: PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels),
                ..Default::default()
            }),
            spec: Some(pod_spec(config, spec, engine)),
        },
        ..Default::default()
    };
    let hashed = serde_json::to_value(&deployment_spec).unwrap_or_default();
    Deployment {
        metadata: metadata(config, spec, &hashed),
        spec: Some(deployment_spec),
        status: None,
    }
}

/// The replica an object of this executor belongs to (its label).
pub(super) fn replica_of(meta: &ObjectMeta) -> Option<&String> {
    meta.labels.as_ref()?.get(LABEL_REPLICA)
}

#[cfg(test)]
pub(super) mod tests;
