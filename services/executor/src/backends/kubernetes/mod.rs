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
//!
//! `objects` builds what is sent; `observe` reads pods into
//! [`Observation`]s, purely; this module is the backend that talks to the
//! API server and keeps which replicas it runs.

mod objects;
mod observe;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_kit::sync::lock;
use flotilla_proto::v1::ReplicaStatus;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};

use super::{Adoption, BackendError, Observation, ReplicaBackend, ReplicaSpec};
use objects::replica_of;
pub use objects::{
    ANNOTATION_MODEL, KubernetesConfig, LABEL_CLUSTER, LABEL_DEPLOYMENT, LABEL_GENERATION,
    LABEL_MANAGED_BY, LABEL_REPLICA, LABEL_RUNTIME, MANAGED_BY, MODELS_MOUNT, PORT,
    deployment_object, object_name,
};
pub use observe::{PodState, observe_pods, pod_state};

fn api_error(e: kube::Error) -> BackendError {
    BackendError::Kubernetes(e)
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
                lock(&self.running).insert(spec.replica_id.clone(), url.clone());
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
        let tracked = lock(&self.running).remove(replica_id).is_some();
        Ok(self.delete(replica_id).await? || tracked)
    }

    fn runs(&self, replica_id: &str) -> bool {
        lock(&self.running).contains_key(replica_id)
    }

    async fn observe(&self) -> Observation {
        let due = {
            let mut last = lock(&self.last_observed);
            let due = last.is_none_or(|t| t.elapsed() >= self.config.poll_interval);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        let running = lock(&self.running).clone();
        if !due || running.is_empty() {
            return Observation::default();
        }
        let pods = match self
            .pods
            .list(&ListParams::default().labels(&self.cluster_selector()))
            .await
        {
            Ok(list) => list.items,
            Err(e) => {
                tracing::warn!(cluster = %self.config.cluster, "reading replica pods: {e}");
                return Observation::default();
            }
        };
        let seen = observe_pods(&running, &pods);
        let moved = {
            let mut running = lock(&self.running);
            for failure in &seen.failed {
                running.remove(&failure.replica_id);
            }
            // Stopped while the pods were listed: no longer this backend's
            // to move.
            seen.moved
                .into_iter()
                .filter(|m| match running.get_mut(&m.replica_id) {
                    Some(url) => {
                        url.clone_from(&m.endpoint);
                        true
                    }
                    None => false,
                })
                .collect()
        };
        for failure in &seen.failed {
            if let Err(e) = self.delete(&failure.replica_id).await {
                tracing::warn!(replica = %failure.replica_id, "deleting the failed replica: {e}");
            }
        }
        Observation {
            failed: seen.failed,
            moved,
        }
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
                    lock(&self.running).insert(id.clone(), url.clone());
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
mod tests;
