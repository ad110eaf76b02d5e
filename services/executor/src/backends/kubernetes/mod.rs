//! Replicas on Kubernetes: one `apps/v1` Deployment of one pod per replica
//! (a Deployment rather than a bare Pod so that Kubernetes re-creates the
//! pod when its node goes, while the executor keeps one object per replica
//! to create, find and delete).
//!
//! A replica larger than one node is one LeaderWorkerSet instead
//! ([`objects::multinode`]): the same labels on every pod of its group,
//! only the leader serving. The backend handles both kinds alike; it
//! watches LeaderWorkerSets only once it has made one, so a cluster
//! without the LWS controller never sees the executor ask for them.
//!
//! The pod runs the runner image (`flotilla-runner`) or, for
//! `runtime: vllm`, the vLLM image (`vllm serve`), with `nvidia.com/gpu`
//! limits from the replica's GPU count, the node selector and tolerations
//! of the start command, a readiness probe on `/health`, and the model
//! cache volume (`--kube-model-pvc`, the same claim the executor's cache
//! lives on) mounted read-only at `/models`. Labels tie every object to
//! its cluster, deployment, replica and generation; a restarted executor
//! finds its replicas by them.
//!
//! The cluster's replica pods and Deployments are watched, not polled
//! ([`watch`]): a start waits on the pod store and wakes when a pod
//! changes; [`observe`](ReplicaBackend::observe) reads the stores. A
//! replica is ready once its pod's `Ready` condition holds, failed when its
//! container cannot start (crash loop, image pull errors) or the pod
//! failed, and while it starts its pod's progress (`Unschedulable` with
//! the scheduler's message, `ContainerCreating`, ...) is reported once per
//! change. A Deployment changed or deleted by another hand is reported as
//! drift and, under the take-over policy, put back.
//!
//! `objects` builds what is sent and finds drift (`drift_json`: what was
//! sent against what the server holds, its defaults and rewritten
//! quantities aside), purely; `observe` reads pods, purely; `nodes` reads the cluster's GPUs from its nodes;
//! this module is the backend that talks to the API server and keeps which
//! replicas it runs.

pub mod nodes;
pub(crate) mod objects;
mod observe;
mod watch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use flotilla_kit::sync::lock;
use flotilla_proto::v1::{DriftPolicy, ReplicaStatus};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{DeleteParams, DynamicObject, ListParams, PostParams};
use kube::runtime::watcher;

use super::{Adoption, BackendError, Drift, Observation, Progress, ReplicaBackend, ReplicaSpec};
pub use objects::reexports::*;
use objects::replica_of;
pub use objects::{
    ANNOTATION_MODEL, KubernetesConfig, LABEL_CLUSTER, LABEL_DEPLOYMENT, LABEL_GENERATION,
    LABEL_MANAGED_BY, LABEL_REPLICA, LABEL_RUNTIME, MANAGED_BY, MODELS_MOUNT, PORT,
    deployment_object, object_name,
};
pub use observe::{PodState, observe_pods, pod_progress, pod_state};
pub use watch::Watched;

fn api_error(e: kube::Error) -> BackendError {
    BackendError::Kubernetes(e)
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn kind_name(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Deployment => "Deployment",
        ObjectKind::LeaderWorkerSet => LWS_KIND,
    }
}

/// A replica's object, of either kind, as built for its spec.
enum ReplicaObject {
    Deployment(Box<Deployment>),
    LeaderWorkerSet(Box<DynamicObject>),
}

impl ReplicaObject {
    fn build(config: &KubernetesConfig, spec: &ReplicaSpec) -> Result<Self, BackendError> {
        Ok(match object_kind(spec)? {
            ObjectKind::Deployment => Self::Deployment(Box::new(deployment_object(config, spec))),
            ObjectKind::LeaderWorkerSet => {
                Self::LeaderWorkerSet(Box::new(lws_object(config, spec)?))
            }
        })
    }

    fn kind(&self) -> ObjectKind {
        match self {
            Self::Deployment(_) => ObjectKind::Deployment,
            Self::LeaderWorkerSet(_) => ObjectKind::LeaderWorkerSet,
        }
    }

    fn to_json(&self) -> Option<serde_json::Value> {
        match self {
            Self::Deployment(d) => serde_json::to_value(d).ok(),
            Self::LeaderWorkerSet(l) => serde_json::to_value(l).ok(),
        }
    }

    /// The object `value` holds (what [`to_json`](Self::to_json) gave).
    fn from_json(kind: ObjectKind, value: &serde_json::Value) -> Result<Self, String> {
        let value = value.clone();
        match kind {
            ObjectKind::Deployment => {
                serde_json::from_value(value).map(|d| Self::Deployment(Box::new(d)))
            }
            ObjectKind::LeaderWorkerSet => {
                serde_json::from_value(value).map(|l| Self::LeaderWorkerSet(Box::new(l)))
            }
        }
        .map_err(|e| e.to_string())
    }

    fn set_resource_version(&mut self, version: Option<String>) {
        match self {
            Self::Deployment(d) => d.metadata.resource_version = version,
            Self::LeaderWorkerSet(l) => l.metadata.resource_version = version,
        }
    }
}

/// The generation label of an object's metadata.
fn generation_of(meta: &ObjectMeta) -> String {
    label_of(meta.labels.as_ref(), LABEL_GENERATION)
}

fn label_of(labels: Option<&BTreeMap<String, String>>, key: &str) -> String {
    labels.and_then(|l| l.get(key)).cloned().unwrap_or_default()
}

/// What the executor sent for a replica it started (or found when it
/// adopted it), to tell drift.
struct Sent {
    kind: ObjectKind,
    object: serde_json::Value,
    policy: DriftPolicy,
    /// The Deployment has been in the store once: its absence since is a
    /// deletion, not a watch that has not caught up.
    seen: bool,
    /// The differences last reported, so one drift is reported once.
    reported: Vec<String>,
}

/// Removes a replica from the starting ones however its start ends
/// (finished, failed or dropped by a stop).
struct Starting<'a> {
    backend: &'a KubernetesBackend,
    replica_id: String,
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        lock(&self.backend.starting).remove(&self.replica_id);
    }
}

/// Runs replicas as Deployments (LeaderWorkerSets when they span nodes)
/// through the Kubernetes API.
pub struct KubernetesBackend {
    config: KubernetesConfig,
    deployments: Api<Deployment>,
    leader_worker_sets: Api<DynamicObject>,
    /// This cluster's replica pods and Deployments.
    pods: Watched<Pod>,
    objects: Watched<Deployment>,
    /// This cluster's replica LeaderWorkerSets, watched from the first
    /// one made.
    lws_objects: OnceLock<Watched<DynamicObject>>,
    /// Replica id to base URL, for the replicas this instance runs.
    running: Mutex<HashMap<String, String>>,
    /// Replicas whose start is under way, with the progress reason last
    /// reported.
    starting: Mutex<HashMap<String, String>>,
    /// What was sent for the replicas started here.
    sent: Mutex<HashMap<String, Sent>>,
    /// The cluster's nodes, to keep pods to the GPU type placement chose.
    inventory: Option<Arc<nodes::NodeInventory>>,
}

impl KubernetesBackend {
    /// The backend of `config.cluster`; starts watching its replica pods
    /// and Deployments, so it must be called inside a Tokio runtime.
    pub fn new(client: kube::Client, config: KubernetesConfig) -> Self {
        let selector = format!(
            "{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_CLUSTER}={}",
            config.cluster
        );
        let watch = || watcher::Config::default().labels(&selector);
        Self {
            deployments: Api::namespaced(client.clone(), &config.namespace),
            leader_worker_sets: Api::namespaced_with(
                client.clone(),
                &config.namespace,
                &lws_resource(),
            ),
            lws_objects: OnceLock::new(),
            pods: Watched::spawn(
                Api::namespaced(client.clone(), &config.namespace),
                watch(),
                "replica pods",
            ),
            objects: Watched::spawn(
                Api::namespaced(client, &config.namespace),
                watch(),
                "replica Deployments",
            ),
            config,
            running: Mutex::new(HashMap::new()),
            starting: Mutex::new(HashMap::new()),
            sent: Mutex::new(HashMap::new()),
            inventory: None,
        }
    }

    /// Keeps replica pods to nodes of the GPU type placement sized them
    /// for, as `inventory` (the executor's view of the nodes) names them.
    #[must_use]
    pub fn with_inventory(mut self, inventory: Arc<nodes::NodeInventory>) -> Self {
        self.inventory = Some(inventory);
        self
    }

    /// `spec` with the GPU products of its GPU model on this cluster.
    fn on_its_gpu_type(&self, spec: &ReplicaSpec) -> ReplicaSpec {
        let mut spec = spec.clone();
        if let Some(inventory) = &self.inventory
            && !spec.gpu_model.is_empty()
            && spec.gpu_products.is_empty()
        {
            spec.gpu_products = inventory.products_of(&spec.gpu_model);
        }
        spec
    }

    fn cluster_selector(&self) -> String {
        format!(
            "{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_CLUSTER}={}",
            self.config.cluster
        )
    }

    /// The LeaderWorkerSets' watch, started on first use.
    fn lws_watch(&self) -> &Watched<DynamicObject> {
        self.lws_objects.get_or_init(|| {
            Watched::spawn_typed(
                self.leader_worker_sets.clone(),
                watcher::Config::default().labels(&self.cluster_selector()),
                lws_resource(),
                "replica LeaderWorkerSets",
            )
        })
    }

    fn pods_of(&self, replica_id: &str) -> Vec<Pod> {
        self.pods
            .store
            .state()
            .iter()
            .filter(|p| replica_of(&p.metadata).is_some_and(|r| r == replica_id))
            .map(|p| Pod::clone(p))
            .collect()
    }

    /// Waits until one of the replica's pods is ready (its URL), one
    /// failed, or `deadline` passed, waking whenever a replica pod
    /// changes.
    async fn wait_ready(
        &self,
        replica_id: &str,
        deadline: Duration,
    ) -> Result<String, BackendError> {
        let until = tokio::time::Instant::now() + deadline;
        let mut changes = self.pods.subscribe();
        let mut last = "no pod yet".to_string();
        loop {
            changes.mark_unchanged();
            let pods = self.pods_of(replica_id);
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
            if let Some((reason, message)) = pods.iter().find_map(pod_progress) {
                last = format!("{reason}: {message}");
            } else if !pods.is_empty() {
                last = "the pod is not ready".into();
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(BackendError::Failed("the pod watch ended".into()));
                    }
                }
                () = tokio::time::sleep_until(until) => {
                    return Err(BackendError::NotReady(deadline, last));
                }
            }
        }
    }

    /// Deletes the replica's object, whichever kind it is; whether there
    /// was one.
    async fn delete(&self, replica_id: &str) -> Result<bool, BackendError> {
        let name = object_name(replica_id);
        let params = DeleteParams::background();
        match self.deployments.delete(&name, &params).await {
            Ok(_) => return Ok(true),
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(api_error(e)),
        }
        match self.leader_worker_sets.delete(&name, &params).await {
            Ok(_) => Ok(true),
            // Not found, or no LeaderWorkerSet API (or no right to it):
            // then the executor cannot have made one either.
            Err(e) if is_status(&e, 404) || is_status(&e, 403) => Ok(false),
            Err(e) => Err(api_error(e)),
        }
    }

    /// The replica's object as the API server holds it, of either kind:
    /// its metadata and the whole of it as JSON.
    async fn find(
        &self,
        replica_id: &str,
    ) -> Result<Option<(ObjectKind, ObjectMeta, serde_json::Value)>, String> {
        let name = object_name(replica_id);
        let json = |o: Result<serde_json::Value, serde_json::Error>| o.unwrap_or_default();
        match self.deployments.get(&name).await {
            Ok(d) => {
                let whole = json(serde_json::to_value(&d));
                return Ok(Some((ObjectKind::Deployment, d.metadata, whole)));
            }
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(format!("reading Deployment {name}: {e}")),
        }
        match self.leader_worker_sets.get(&name).await {
            Ok(l) => {
                let whole = json(serde_json::to_value(&l));
                Ok(Some((ObjectKind::LeaderWorkerSet, l.metadata, whole)))
            }
            Err(e) if is_status(&e, 404) || is_status(&e, 403) => Ok(None),
            Err(e) => Err(format!("reading {LWS_KIND} {name}: {e}")),
        }
    }

    async fn post(&self, object: &ReplicaObject) -> Result<(), kube::Error> {
        let params = PostParams::default();
        match object {
            ReplicaObject::Deployment(d) => self.deployments.create(&params, d).await.map(|_| ()),
            ReplicaObject::LeaderWorkerSet(l) => {
                self.leader_worker_sets.create(&params, l).await.map(|_| ())
            }
        }
    }

    async fn put(&self, name: &str, object: &ReplicaObject) -> Result<(), kube::Error> {
        let params = PostParams::default();
        match object {
            ReplicaObject::Deployment(d) => {
                self.deployments.replace(name, &params, d).await.map(|_| ())
            }
            ReplicaObject::LeaderWorkerSet(l) => self
                .leader_worker_sets
                .replace(name, &params, l)
                .await
                .map(|_| ()),
        }
    }

    /// Creates the replica's object and returns at once (what
    /// [`start`](ReplicaBackend::start) does before it waits).
    pub async fn create(&self, spec: &ReplicaSpec) -> Result<(), BackendError> {
        let spec = &self.on_its_gpu_type(spec);
        let object = ReplicaObject::build(&self.config, spec)?;
        let kind = object.kind();
        if kind == ObjectKind::LeaderWorkerSet {
            self.lws_watch();
        }
        if let Some(sent) = object.to_json() {
            lock(&self.sent).insert(
                spec.replica_id.clone(),
                Sent {
                    kind,
                    object: sent,
                    policy: spec.drift_policy,
                    seen: false,
                    reported: Vec::new(),
                },
            );
        }
        let name = object_name(&spec.replica_id);
        match self.post(&object).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 409) => {
                // Created by an earlier attempt: the same replica only if
                // it is of the same generation.
                let generation = match self.find(&spec.replica_id).await {
                    Ok(Some((_, meta, _))) => generation_of(&meta),
                    Ok(None) => String::new(),
                    Err(e) => return Err(BackendError::Failed(e)),
                };
                if generation == spec.generation.to_string() {
                    Ok(())
                } else {
                    Err(BackendError::Failed(format!(
                        "{} {name} exists for generation {generation:?}, not {}",
                        kind_name(kind),
                        spec.generation
                    )))
                }
            }
            Err(e) if kind == ObjectKind::LeaderWorkerSet && is_status(&e, 404) => {
                Err(BackendError::Failed(format!(
                    "replica {} spans {} nodes, which takes a {LWS_KIND} ({LWS_API_VERSION}), \
                     and creating {name} was refused ({e}): install the LeaderWorkerSet \
                     controller in this cluster (docs/deploy-kubernetes.md, \"Replicas larger \
                     than one node\")",
                    spec.replica_id, spec.pipeline_parallel
                )))
            }
            Err(e) => Err(api_error(e)),
        }
    }

    /// Progress of the starting replicas not reported yet.
    fn progress(&self, pods: &[Pod]) -> Vec<Progress> {
        let mut starting = lock(&self.starting);
        let mut ids: Vec<&String> = starting.keys().collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            let said = pods
                .iter()
                .filter(|p| replica_of(&p.metadata) == Some(id))
                .find_map(pod_progress);
            if let Some((reason, message)) = said {
                out.push(Progress {
                    replica_id: id.clone(),
                    reason,
                    message,
                });
            }
        }
        out.retain(|p| {
            starting.get_mut(&p.replica_id).is_some_and(|last| {
                if *last == p.reason {
                    return false;
                }
                last.clone_from(&p.reason);
                true
            })
        });
        out
    }

    /// The replica object named `name` of `kind` in its watch's store,
    /// as JSON; `Err(())` while that watch has not listed yet.
    fn live(&self, kind: ObjectKind, name: &str) -> Result<Option<serde_json::Value>, ()> {
        match kind {
            ObjectKind::Deployment if self.objects.synced() => Ok(self
                .objects
                .store
                .find(|d| d.metadata.name.as_deref() == Some(name))
                .and_then(|d| serde_json::to_value(d.as_ref()).ok())),
            ObjectKind::LeaderWorkerSet => match self.lws_objects.get() {
                Some(watched) if watched.synced() => Ok(watched
                    .store
                    .find(|l| l.metadata.name.as_deref() == Some(name))
                    .and_then(|l| serde_json::to_value(l.as_ref()).ok())),
                _ => Err(()),
            },
            ObjectKind::Deployment => Err(()),
        }
    }

    /// Objects of replicas started here that no longer hold what was
    /// sent, or are gone; put back under the take-over policy.
    async fn drift(&self) -> Vec<Drift> {
        let mut found = Vec::new();
        {
            let mut sent = lock(&self.sent);
            let mut ids: Vec<String> = sent.keys().cloned().collect();
            ids.sort();
            for id in ids {
                let Some(entry) = sent.get_mut(&id) else {
                    continue;
                };
                let Ok(live) = self.live(entry.kind, &object_name(&id)) else {
                    continue;
                };
                let differences = match &live {
                    None if !entry.seen => continue,
                    None => vec!["deleted".to_string()],
                    Some(live) => {
                        entry.seen = true;
                        drift_json(&entry.object, live)
                    }
                };
                if differences.is_empty() {
                    entry.reported.clear();
                    continue;
                }
                if differences == entry.reported {
                    continue;
                }
                entry.reported.clone_from(&differences);
                let version = live
                    .as_ref()
                    .and_then(|l| l["metadata"]["resourceVersion"].as_str())
                    .map(String::from);
                found.push((
                    id,
                    entry.kind,
                    entry.object.clone(),
                    entry.policy,
                    differences,
                    live.map(|_| version),
                ));
            }
        }
        let mut out = Vec::new();
        for (replica_id, kind, object, policy, differences, live) in found {
            let restored = match policy {
                DriftPolicy::ReportOnly => Ok(false),
                DriftPolicy::TakeOver | DriftPolicy::Unspecified => self
                    .restore(&replica_id, kind, &object, live)
                    .await
                    .map(|()| true),
            };
            if let Err(e) = &restored {
                // Tried again when the object changes next.
                if let Some(entry) = lock(&self.sent).get_mut(&replica_id) {
                    entry.reported.clear();
                }
                tracing::warn!(replica = %replica_id, "putting its object back: {e}");
            }
            out.push(Drift {
                replica_id,
                differences,
                restored,
            });
        }
        out
    }

    /// Puts back `object` (what was sent): replaces the live object (of
    /// that resource version), or creates it again when it is gone
    /// (`None`).
    async fn restore(
        &self,
        replica_id: &str,
        kind: ObjectKind,
        object: &serde_json::Value,
        live: Option<Option<String>>,
    ) -> Result<(), String> {
        let mut object = ReplicaObject::from_json(kind, object)?;
        let name = object_name(replica_id);
        let done = match live {
            Some(version) => {
                object.set_resource_version(version);
                self.put(&name, &object).await
            }
            None => self.post(&object).await,
        };
        done.map_err(|e| e.to_string())
    }
}

impl ReplicaBackend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn start(&self, spec: &ReplicaSpec) -> Result<String, BackendError> {
        lock(&self.starting).insert(spec.replica_id.clone(), String::new());
        let _starting = Starting {
            backend: self,
            replica_id: spec.replica_id.clone(),
        };
        if let Err(e) = self.create(spec).await {
            lock(&self.sent).remove(&spec.replica_id);
            return Err(e);
        }
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
                lock(&self.sent).remove(&spec.replica_id);
                if let Err(delete) = self.delete(&spec.replica_id).await {
                    tracing::warn!(replica = %spec.replica_id, "deleting the failed replica: {delete}");
                }
                Err(e)
            }
        }
    }

    async fn stop(&self, replica_id: &str) -> Result<bool, BackendError> {
        let tracked = lock(&self.running).remove(replica_id).is_some();
        // Its deletion is the executor's own, not drift.
        let sent = lock(&self.sent).remove(replica_id).is_some();
        Ok(self.delete(replica_id).await? || tracked || sent)
    }

    fn fetches_models(&self) -> bool {
        matches!(self.config.model_delivery, ModelDelivery::NodeCache { .. })
    }

    fn runs(&self, replica_id: &str) -> bool {
        lock(&self.running).contains_key(replica_id)
    }

    async fn observe(&self) -> Observation {
        if !self.pods.synced() {
            return Observation::default();
        }
        let pods: Vec<Pod> = self
            .pods
            .store
            .state()
            .iter()
            .map(|p| Pod::clone(p))
            .collect();
        let running = lock(&self.running).clone();
        let seen = observe_pods(&running, &pods);
        let moved = {
            let mut running = lock(&self.running);
            let mut sent = lock(&self.sent);
            for failure in &seen.failed {
                running.remove(&failure.replica_id);
                sent.remove(&failure.replica_id);
            }
            // Stopped while the pods were read: no longer this backend's
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
        let progress = self.progress(&pods);
        let drifted = self.drift().await;
        Observation {
            failed: seen.failed,
            moved,
            progress,
            drifted,
        }
    }

    async fn adopt(&self, recorded: &ReplicaStatus) -> Adoption {
        let id = &recorded.replica_id;
        let name = object_name(id);
        let (kind, meta, whole) = match self.find(id).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                return Adoption::Gone(format!(
                    "no Deployment or {LWS_KIND} {name} when the executor restarted"
                ));
            }
            Err(e) => return Adoption::Refused(e),
        };
        let what = format!("{} {name}", kind_name(kind));
        let label = |key: &str| label_of(meta.labels.as_ref(), key);
        let model = label_of(meta.annotations.as_ref(), ANNOTATION_MODEL);
        let why_not = if generation_of(&meta) != recorded.generation.to_string() {
            Some(format!(
                "{what} is of generation {:?}, the record says {}",
                generation_of(&meta),
                recorded.generation
            ))
        } else if label(LABEL_CLUSTER) != self.config.cluster || model != recorded.model {
            Some(format!(
                "{what} is of cluster {:?} serving {model:?}, the record says {} serving {}",
                label(LABEL_CLUSTER),
                self.config.cluster,
                recorded.model
            ))
        } else {
            match self.wait_ready(id, self.config.ready_timeout).await {
                Ok(url) => {
                    lock(&self.running).insert(id.clone(), url.clone());
                    // Changes from here on are drift, measured against
                    // what it holds now (what changed while no executor
                    // watched cannot be told from what was sent).
                    if kind == ObjectKind::LeaderWorkerSet {
                        self.lws_watch();
                    }
                    let policy = drift_policy_of(
                        meta.annotations
                            .as_ref()
                            .and_then(|a| a.get(ANNOTATION_DRIFT_POLICY))
                            .map(String::as_str),
                    );
                    lock(&self.sent).insert(
                        id.clone(),
                        Sent {
                            kind,
                            object: adopted_baseline(&whole),
                            policy,
                            seen: true,
                            reported: Vec::new(),
                        },
                    );
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
        let params = ListParams::default().labels(&self.cluster_selector());
        let mut metas: Vec<ObjectMeta> = match self.deployments.list(&params).await {
            Ok(list) => list.items.into_iter().map(|d| d.metadata).collect(),
            Err(e) => {
                tracing::warn!("listing replica Deployments: {e}");
                return Vec::new();
            }
        };
        match self.leader_worker_sets.list(&params).await {
            Ok(list) => metas.extend(list.items.into_iter().map(|l| l.metadata)),
            // No LeaderWorkerSet API here (or no right to it): none made.
            Err(e) if is_status(&e, 404) || is_status(&e, 403) => {}
            Err(e) => {
                tracing::warn!("listing replica {LWS_KIND}s: {e}");
                return Vec::new();
            }
        }
        let mut stopped = Vec::new();
        for meta in metas {
            let Some(id) = replica_of(&meta).cloned() else {
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
