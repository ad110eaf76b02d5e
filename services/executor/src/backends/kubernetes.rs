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
    last_observed: Mutex<Option<Instant>>,
}

impl KubernetesBackend {
    pub fn new(client: kube::Client, config: KubernetesConfig) -> Self {
        Self {
            deployments: Api::namespaced(client.clone(), &config.namespace),
            pods: Api::namespaced(client, &config.namespace),
            config,
            running: Mutex::new(HashMap::new()),
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
                .filter(|p| {
                    p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(LABEL_REPLICA))
                        == Some(&id)
                })
                .map(pod_state)
                .collect();
            if states.iter().any(|s| matches!(s, PodState::Ready(_))) {
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
            let Some(id) = d
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_REPLICA))
                .cloned()
            else {
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
