//! Replicas on Kubernetes: one `apps/v1` Deployment of one pod per replica
//! (a Deployment rather than a bare Pod so that Kubernetes re-creates the
//! pod when its node goes, while the executor keeps one object per replica
//! to create, find and delete).
//!
//! The pod runs the runner image (`flotilla-runner`) or, for
//! `runtime: vllm`, the vLLM image (`vllm serve`), with `nvidia.com/gpu`
//! limits from the replica's GPU count, the node selector and tolerations
//! of the start command, a readiness probe on `/health`, and the model
//! cache volume (`--kube-model-pvc`, the same claim the executor's cache
//! lives on) mounted read-only at `/models`. Labels tie every object to
//! its cluster, deployment, replica and generation; a restarted executor
//! finds its replicas by them. Pod status is polled: ready once the pod's
//! `Ready` condition holds, failed when its container cannot start
//! (crash loop, image pull errors) or the pod failed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_proto::v1::{self, ReplicaStatus, TaintEffect, TolerationOperator};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};

use super::{Adoption, BackendError, ReplicaBackend, ReplicaFailure, ReplicaSpec};

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

/// Container waiting reasons that mean the replica will not start by
/// itself.
const FATAL_WAITING_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

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

/// What one pod says about its replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Ready; its base URL.
    Ready(String),
    /// Scheduling, pulling, loading.
    Pending,
    /// It will not become ready by itself; why.
    Failed(String),
}

/// The replica an object of this executor belongs to (its label).
fn replica_of(meta: &ObjectMeta) -> Option<&String> {
    meta.labels.as_ref()?.get(LABEL_REPLICA)
}

pub fn pod_state(pod: &Pod) -> PodState {
    let Some(status) = pod.status.as_ref() else {
        return PodState::Pending;
    };
    if status.phase.as_deref() == Some("Failed") {
        return PodState::Failed(format!(
            "pod failed: {}",
            status
                .message
                .clone()
                .or_else(|| status.reason.clone())
                .unwrap_or_default()
        ));
    }
    for container in status.container_statuses.iter().flatten() {
        if let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = waiting.reason.clone().unwrap_or_default();
            if FATAL_WAITING_REASONS.contains(&reason.as_str()) {
                return PodState::Failed(format!(
                    "container {}: {reason}: {}",
                    container.name,
                    waiting.message.clone().unwrap_or_default()
                ));
            }
        }
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    match (ready, status.pod_ip.as_deref()) {
        (true, Some(ip)) if !ip.is_empty() => PodState::Ready(format!("http://{ip}:{PORT}")),
        _ => PodState::Pending,
    }
}

fn api_error(e: kube::Error) -> BackendError {
    BackendError::Kubernetes(e.to_string())
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Runs replicas as Deployments through the Kubernetes API.
pub struct KubernetesBackend {
    config: KubernetesConfig,
    deployments: Api<Deployment>,
    pods: Api<Pod>,
    /// Replica id to base URL, for the replicas this instance runs.
    running: Mutex<HashMap<String, String>>,
    /// Replicas `observe` found serving at a new address, for `take_moved`.
    moved: Mutex<Vec<(String, String)>>,
    last_observed: Mutex<Option<Instant>>,
}

impl KubernetesBackend {
    pub fn new(client: kube::Client, config: KubernetesConfig) -> Self {
        Self {
            deployments: Api::namespaced(client.clone(), &config.namespace),
            pods: Api::namespaced(client, &config.namespace),
            config,
            running: Mutex::new(HashMap::new()),
            moved: Mutex::new(Vec::new()),
            last_observed: Mutex::new(None),
        }
    }

    fn cluster_selector(&self) -> String {
        format!(
            "{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_CLUSTER}={}",
            self.config.cluster
        )
    }

    async fn pods_of(&self, replica_id: &str) -> Result<Vec<Pod>, BackendError> {
        let selector = format!(
            "{LABEL_CLUSTER}={},{LABEL_REPLICA}={replica_id}",
            self.config.cluster
        );
        Ok(self
            .pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(api_error)?
            .items)
    }

    /// Polls the replica's pods until one is ready (its URL), one failed,
    /// or `deadline` passed.
    async fn wait_ready(
        &self,
        replica_id: &str,
        deadline: Duration,
    ) -> Result<String, BackendError> {
        let started = Instant::now();
        let mut last = "no pod yet".to_string();
        loop {
            let pods = self.pods_of(replica_id).await?;
            let states: Vec<PodState> = pods.iter().map(pod_state).collect();
            if let Some(url) = states.iter().find_map(|s| match s {
                PodState::Ready(url) => Some(url.clone()),
                _ => None,
            }) {
                return Ok(url);
            }
            if let Some(why) = states.iter().find_map(|s| match s {
                PodState::Failed(why) => Some(why.clone()),
                _ => None,
            }) {
                return Err(BackendError::Failed(why));
            }
            if !pods.is_empty() {
                last = "the pod is not ready".into();
            }
            if started.elapsed() >= deadline {
                return Err(BackendError::NotReady(deadline, last));
            }
            tokio::time::sleep(self.config.poll_interval).await;
        }
    }

    async fn delete(&self, replica_id: &str) -> Result<bool, BackendError> {
        match self
            .deployments
            .delete(&object_name(replica_id), &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 404) => Ok(false),
            Err(e) => Err(api_error(e)),
        }
    }

    /// Creates the replica's Deployment and returns at once (what
    /// [`start`](ReplicaBackend::start) does before it waits).
    pub async fn create(&self, spec: &ReplicaSpec) -> Result<(), BackendError> {
        let object = deployment_object(&self.config, spec);
        match self
            .deployments
            .create(&PostParams::default(), &object)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => {
                // Created by an earlier attempt: the same replica only if
                // it is of the same generation.
                let existing = self
                    .deployments
                    .get(&object_name(&spec.replica_id))
                    .await
                    .map_err(api_error)?;
                let generation = existing
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_GENERATION))
                    .cloned()
                    .unwrap_or_default();
                if generation == spec.generation.to_string() {
                    Ok(())
                } else {
                    Err(BackendError::Failed(format!(
                        "Deployment {} exists for generation {generation:?}, not {}",
                        object_name(&spec.replica_id),
                        spec.generation
                    )))
                }
            }
            Err(e) => Err(api_error(e)),
        }
    }
}

impl ReplicaBackend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn start(&self, spec: &ReplicaSpec) -> Result<String, BackendError> {
        self.create(spec).await?;
        match self
            .wait_ready(&spec.replica_id, self.config.ready_timeout)
            .await
        {
            Ok(url) => {
                if let Ok(mut running) = self.running.lock() {
                    running.insert(spec.replica_id.clone(), url.clone());
                }
                Ok(url)
            }
            Err(e) => {
                // A replica that failed must not hold GPUs.
                if let Err(delete) = self.delete(&spec.replica_id).await {
                    tracing::warn!(replica = %spec.replica_id, "deleting the failed replica: {delete}");
                }
                Err(e)
            }
        }
    }

    async fn stop(&self, replica_id: &str) -> Result<bool, BackendError> {
        let tracked = self
            .running
            .lock()
            .ok()
            .and_then(|mut r| r.remove(replica_id))
            .is_some();
        Ok(self.delete(replica_id).await? || tracked)
    }

    fn runs(&self, replica_id: &str) -> bool {
        self.running
            .lock()
            .map(|r| r.contains_key(replica_id))
            .unwrap_or(false)
    }

    async fn observe(&self) -> Vec<ReplicaFailure> {
        let due = self.last_observed.lock().is_ok_and(|mut last| {
            let due = last.is_none_or(|t| t.elapsed() >= self.config.poll_interval);
            if due {
                *last = Some(Instant::now());
            }
            due
        });
        let running: Vec<String> = self
            .running
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        if !due || running.is_empty() {
            return Vec::new();
        }
        let pods = match self
            .pods
            .list(&ListParams::default().labels(&self.cluster_selector()))
            .await
        {
            Ok(list) => list.items,
            Err(e) => {
                tracing::warn!("reading replica pods: {e}");
                return Vec::new();
            }
        };
        let mut failures = Vec::new();
        for id in running {
            let states: Vec<PodState> = pods
                .iter()
                .filter(|p| replica_of(&p.metadata) == Some(&id))
                .map(pod_state)
                .collect();
            let ready: Vec<&String> = states
                .iter()
                .filter_map(|s| match s {
                    PodState::Ready(url) => Some(url),
                    _ => None,
                })
                .collect();
            if let Some(first) = ready.first() {
                // Its pod was re-created elsewhere (a node left): serve
                // from where it is now, unless the old address still is.
                if let Ok(mut r) = self.running.lock()
                    && let Some(current) = r.get_mut(&id)
                    && !ready.contains(&&*current)
                {
                    *current = (*first).clone();
                    if let Ok(mut moved) = self.moved.lock() {
                        moved.push((id.clone(), (*first).clone()));
                    }
                }
                continue;
            }
            if let Some(reason) = states.into_iter().find_map(|s| match s {
                PodState::Failed(why) => Some(why),
                _ => None,
            }) {
                if let Ok(mut r) = self.running.lock() {
                    r.remove(&id);
                }
                if let Err(e) = self.delete(&id).await {
                    tracing::warn!(replica = %id, "deleting the failed replica: {e}");
                }
                failures.push(ReplicaFailure {
                    replica_id: id,
                    reason,
                });
            }
        }
        failures
    }

    fn take_moved(&self) -> Vec<(String, String)> {
        self.moved
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }

    async fn adopt(&self, recorded: &ReplicaStatus) -> Adoption {
        let id = &recorded.replica_id;
        let existing = match self.deployments.get(&object_name(id)).await {
            Ok(d) => d,
            Err(e) if is_status(&e, 404) => {
                return Adoption::Gone(format!(
                    "no Deployment {} when the executor restarted",
                    object_name(id)
                ));
            }
            Err(e) => {
                return Adoption::Refused(format!("reading Deployment {}: {e}", object_name(id)));
            }
        };
        let label = |key: &str| {
            existing
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(key))
                .cloned()
                .unwrap_or_default()
        };
        let model = existing
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_MODEL))
            .cloned()
            .unwrap_or_default();
        let why_not = if label(LABEL_GENERATION) != recorded.generation.to_string() {
            Some(format!(
                "Deployment {} is of generation {:?}, the record says {}",
                object_name(id),
                label(LABEL_GENERATION),
                recorded.generation
            ))
        } else if label(LABEL_CLUSTER) != self.config.cluster || model != recorded.model {
            Some(format!(
                "Deployment {} is of cluster {:?} serving {model:?}, the record says {} serving {}",
                object_name(id),
                label(LABEL_CLUSTER),
                self.config.cluster,
                recorded.model
            ))
        } else {
            match self.wait_ready(id, self.config.ready_timeout).await {
                Ok(url) => {
                    if let Ok(mut running) = self.running.lock() {
                        running.insert(id.clone(), url.clone());
                    }
                    return Adoption::Adopted(url);
                }
                Err(e) => Some(e.to_string()),
            }
        };
        let why = why_not.unwrap_or_default();
        if let Err(e) = self.delete(id).await {
            tracing::warn!(replica = %id, "deleting a replica not vouched for: {e}");
        }
        Adoption::Refused(format!("not vouched for, so deleted: {why}"))
    }

    async fn stop_unknown(&self, known: &HashSet<String>) -> Vec<String> {
        let list = match self
            .deployments
            .list(&ListParams::default().labels(&self.cluster_selector()))
            .await
        {
            Ok(list) => list.items,
            Err(e) => {
                tracing::warn!("listing replica Deployments: {e}");
                return Vec::new();
            }
        };
        let mut stopped = Vec::new();
        for d in list {
            let Some(id) = replica_of(&d.metadata).cloned() else {
                continue;
            };
            if known.contains(&id) || self.runs(&id) {
                continue;
            }
            match self.delete(&id).await {
                Ok(_) => stopped.push(id),
                Err(e) => tracing::warn!(replica = %id, "deleting an unrecorded replica: {e}"),
            }
        }
        stopped
    }
}

#[cfg(test)]
mod tests {
    //! Against kube's `tower-test` mock API server: every request the
    //! backend sends is checked, objects field by field.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::{Value, json};
    use tower_test::mock::{Handle, SendResponse};

    use super::*;

    type ApiHandle = Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>;
    type Reply = SendResponse<http::Response<kube::client::Body>>;

    fn config() -> KubernetesConfig {
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

    fn spec(runtime: v1::Runtime) -> ReplicaSpec {
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
        }
    }

    fn backend() -> (KubernetesBackend, ApiHandle) {
        let (service, handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(service, "default");
        (KubernetesBackend::new(client, config()), handle)
    }

    /// The next request: method, path, query, JSON body (or null).
    async fn next(handle: &mut ApiHandle) -> (http::Method, String, String, Value, Reply) {
        let (request, reply) = handle.next_request().await.expect("a request");
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (method, path, query, body, reply)
    }

    fn answer(reply: Reply, status: u16, body: &Value) {
        reply.send_response(
            http::Response::builder()
                .status(status)
                .body(kube::client::Body::from(serde_json::to_vec(body).unwrap()))
                .unwrap(),
        );
    }

    fn not_found() -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "not found", "reason": "NotFound", "code": 404})
    }

    fn pod(replica: &str, status: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": format!("flotilla-{replica}-abc"), "labels": {LABEL_REPLICA: replica, LABEL_CLUSTER: "eu-1"}},
               "status": status})
    }

    fn pod_list(pods: Vec<Value>) -> Value {
        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods})
    }

    fn ready_status(ip: &str) -> Value {
        json!({"phase": "Running", "podIP": ip,
               "conditions": [{"type": "Ready", "status": "True"}]})
    }

    const REPLICA_PODS_QUERY: &str =
        "labelSelector=flotilla.dev%2Fcluster%3Deu-1%2Cflotilla.dev%2Freplica%3Dchat-g3-0";

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

    #[tokio::test]
    async fn start_creates_the_deployment_and_waits_for_a_ready_pod() {
        let (backend, mut api) = backend();
        let server = tokio::spawn(async move {
            let (method, path, _, body, reply) = next(&mut api).await;
            assert_eq!(method, http::Method::POST);
            assert_eq!(path, "/apis/apps/v1/namespaces/flotilla/deployments");
            assert_eq!(
                body,
                serde_json::to_value(deployment_object(&config(), &spec(v1::Runtime::Candle)))
                    .unwrap()
            );
            answer(reply, 201, &body);
            // Scheduled but not ready, then ready.
            let (method, path, query, _, reply) = next(&mut api).await;
            assert_eq!(method, http::Method::GET);
            assert_eq!(path, "/api/v1/namespaces/flotilla/pods");
            assert!(query.contains(REPLICA_PODS_QUERY), "{query}");
            answer(
                reply,
                200,
                &pod_list(vec![pod("chat-g3-0", json!({"phase": "Pending"}))]),
            );
            let (_, path, _, _, reply) = next(&mut api).await;
            assert_eq!(path, "/api/v1/namespaces/flotilla/pods");
            answer(
                reply,
                200,
                &pod_list(vec![pod("chat-g3-0", ready_status("10.1.2.3"))]),
            );
        });
        let url = backend.start(&spec(v1::Runtime::Candle)).await.unwrap();
        server.await.unwrap();
        assert_eq!(url, "http://10.1.2.3:8000");
        assert!(backend.runs("chat-g3-0"));
    }

    #[tokio::test]
    async fn a_crash_looping_pod_fails_the_start_and_its_deployment_is_deleted() {
        let (backend, mut api) = backend();
        let server = tokio::spawn(async move {
            let (method, _, _, body, reply) = next(&mut api).await;
            assert_eq!(method, http::Method::POST);
            answer(reply, 201, &body);
            let (_, _, _, _, reply) = next(&mut api).await;
            answer(
                reply,
                200,
                &pod_list(vec![pod(
                    "chat-g3-0",
                    json!({"phase": "Running", "containerStatuses": [{
                        "name": "replica", "image": "flotilla-runner:test", "imageID": "",
                        "ready": false, "restartCount": 4,
                        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 1m0s"}}}]}),
                )]),
            );
            let (method, path, _, body, reply) = next(&mut api).await;
            assert_eq!(method, http::Method::DELETE);
            assert_eq!(
                path,
                "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-chat-g3-0"
            );
            assert_eq!(body["propagationPolicy"], "Background");
            answer(
                reply,
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            );
        });
        let err = backend.start(&spec(v1::Runtime::Candle)).await.unwrap_err();
        server.await.unwrap();
        assert!(err.to_string().contains("CrashLoopBackOff"), "{err}");
        assert!(!backend.runs("chat-g3-0"));
    }

    #[tokio::test]
    async fn stop_deletes_the_deployment_and_a_missing_one_is_not_an_error() {
        let (backend, mut api) = backend();
        let server = tokio::spawn(async move {
            let (method, path, _, _, reply) = next(&mut api).await;
            assert_eq!(method, http::Method::DELETE);
            assert_eq!(
                path,
                "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-chat-g3-0"
            );
            answer(
                reply,
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            );
            let (method, path, _, _, reply) = next(&mut api).await;
            assert_eq!(method, http::Method::DELETE);
            assert_eq!(
                path,
                "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-gone-0"
            );
            answer(reply, 404, &not_found());
        });
        assert!(backend.stop("chat-g3-0").await.unwrap());
        assert!(!backend.stop("gone-0").await.unwrap());
        server.await.unwrap();
    }

    fn recorded(generation: u64) -> ReplicaStatus {
        ReplicaStatus {
            replica_id: "chat-g3-0".into(),
            cluster: "eu-1".into(),
            deployment: "chat".into(),
            generation,
            model: "smollm2".into(),
            endpoint: "http://10.1.2.3:8000".into(),
            phase: v1::ReplicaPhase::Ready.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_restarted_executor_adopts_its_ready_replica() {
        let (backend, mut api) = backend();
        let server = tokio::spawn(async move {
            let (method, path, _, _, reply) = next(&mut api).await;
            assert_eq!(method, http::Method::GET);
            assert_eq!(
                path,
                "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-chat-g3-0"
            );
            let existing =
                serde_json::to_value(deployment_object(&config(), &spec(v1::Runtime::Candle)))
                    .unwrap();
            answer(reply, 200, &existing);
            let (_, path, query, _, reply) = next(&mut api).await;
            assert_eq!(path, "/api/v1/namespaces/flotilla/pods");
            assert!(query.contains(REPLICA_PODS_QUERY), "{query}");
            answer(
                reply,
                200,
                &pod_list(vec![pod("chat-g3-0", ready_status("10.1.2.3"))]),
            );
        });
        let adoption = backend.adopt(&recorded(3)).await;
        server.await.unwrap();
        assert_eq!(adoption, Adoption::Adopted("http://10.1.2.3:8000".into()));
        assert!(backend.runs("chat-g3-0"));
    }

    #[tokio::test]
    async fn a_replica_of_another_generation_is_deleted_not_adopted() {
        let (backend, mut api) = backend();
        let server = tokio::spawn(async move {
            let (_, _, _, _, reply) = next(&mut api).await;
            let mut older = spec(v1::Runtime::Candle);
            older.generation = 2;
            answer(
                reply,
                200,
                &serde_json::to_value(deployment_object(&config(), &older)).unwrap(),
            );
            let (method, path, _, _, reply) = next(&mut api).await;
            assert_eq!(method, http::Method::DELETE);
            assert_eq!(
                path,
                "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-chat-g3-0"
            );
            answer(
                reply,
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            );
        });
        let adoption = backend.adopt(&recorded(3)).await;
        server.await.unwrap();
        assert!(
            matches!(&adoption, Adoption::Refused(why) if why.contains("generation")),
            "{adoption:?}"
        );
        assert!(!backend.runs("chat-g3-0"));
    }

    #[tokio::test]
    async fn a_missing_deployment_is_gone() {
        let (backend, mut api) = backend();
        let server = tokio::spawn(async move {
            let (_, _, _, _, reply) = next(&mut api).await;
            answer(reply, 404, &not_found());
        });
        let adoption = backend.adopt(&recorded(3)).await;
        server.await.unwrap();
        assert!(matches!(adoption, Adoption::Gone(_)), "{adoption:?}");
    }

    #[tokio::test]
    async fn deployments_no_record_knows_are_deleted() {
        let (backend, mut api) = backend();
        let server = tokio::spawn(async move {
            let (method, path, query, _, reply) = next(&mut api).await;
            assert_eq!(method, http::Method::GET);
            assert_eq!(path, "/apis/apps/v1/namespaces/flotilla/deployments");
            assert!(
                query.contains(
                    "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dflotilla-executor%2Cflotilla.dev%2Fcluster%3Deu-1"
                ),
                "{query}"
            );
            let known = deployment_object(&config(), &spec(v1::Runtime::Candle));
            let mut stray_spec = spec(v1::Runtime::Candle);
            stray_spec.replica_id = "stray-0".into();
            let stray = deployment_object(&config(), &stray_spec);
            answer(
                reply,
                200,
                &json!({"apiVersion": "apps/v1", "kind": "DeploymentList", "metadata": {},
                        "items": [known, stray]}),
            );
            let (method, path, _, _, reply) = next(&mut api).await;
            assert_eq!(method, http::Method::DELETE);
            assert_eq!(
                path,
                "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-stray-0"
            );
            answer(
                reply,
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            );
        });
        let known = HashSet::from(["chat-g3-0".to_string()]);
        let stopped = backend.stop_unknown(&known).await;
        server.await.unwrap();
        assert_eq!(stopped, ["stray-0"]);
    }

    #[tokio::test]
    async fn a_pod_that_fails_after_ready_is_reported_and_deleted() {
        let (backend, mut api) = backend();
        if let Ok(mut running) = backend.running.lock() {
            running.insert("chat-g3-0".into(), "http://10.1.2.3:8000".into());
        }
        let server = tokio::spawn(async move {
            let (_, path, query, _, reply) = next(&mut api).await;
            assert_eq!(path, "/api/v1/namespaces/flotilla/pods");
            assert!(query.contains("flotilla.dev%2Fcluster%3Deu-1"), "{query}");
            answer(
                reply,
                200,
                &pod_list(vec![pod(
                    "chat-g3-0",
                    json!({"phase": "Failed", "message": "The node was low on resource: memory."}),
                )]),
            );
            let (method, _, _, _, reply) = next(&mut api).await;
            assert_eq!(method, http::Method::DELETE);
            answer(
                reply,
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            );
        });
        let failures = backend.observe().await;
        server.await.unwrap();
        assert_eq!(failures.len(), 1);
        assert!(
            failures[0].reason.contains("low on resource"),
            "{failures:?}"
        );
        assert!(!backend.runs("chat-g3-0"));
    }

    #[tokio::test]
    async fn a_pod_re_created_on_another_node_moves_the_replica() {
        let (backend, mut api) = backend();
        if let Ok(mut running) = backend.running.lock() {
            running.insert("chat-g3-0".into(), "http://10.1.2.3:8000".into());
        }
        let server = tokio::spawn(async move {
            for ip in ["10.1.2.3", "10.4.5.6", "10.4.5.6"] {
                let (_, path, _, _, reply) = next(&mut api).await;
                assert_eq!(path, "/api/v1/namespaces/flotilla/pods");
                answer(
                    reply,
                    200,
                    &pod_list(vec![pod("chat-g3-0", ready_status(ip))]),
                );
            }
        });
        // Where it started: nothing moved.
        assert!(backend.observe().await.is_empty());
        assert!(backend.take_moved().is_empty());
        // Its pod came back elsewhere: one move, reported once.
        *backend.last_observed.lock().unwrap() = None;
        assert!(backend.observe().await.is_empty());
        assert_eq!(
            backend.take_moved(),
            vec![("chat-g3-0".to_string(), "http://10.4.5.6:8000".to_string())]
        );
        assert!(backend.take_moved().is_empty());
        *backend.last_observed.lock().unwrap() = None;
        assert!(backend.observe().await.is_empty());
        assert!(backend.take_moved().is_empty(), "already there");
        server.await.unwrap();
        assert!(backend.runs("chat-g3-0"));
    }
}
