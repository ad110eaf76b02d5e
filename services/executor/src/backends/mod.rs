//! Where replicas run. [`ReplicaBackend`] is the one interface the replica
//! half talks to; [`local::LocalBackend`] runs processes on this machine and
//! [`kubernetes::KubernetesBackend`] runs one Deployment per replica;
//! [`simulated::SimulatedBackend`] runs nothing, for fleet-scale benches.
//!
//! A backend never touches the bus: it starts, stops, observes and adopts
//! replicas, and the replica half turns what it says into KV records and
//! events.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_proto::v1::{self, ReplicaStatus};

pub mod kubernetes;
pub mod local;
pub mod simulated;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "runner binary {0} not found; build it (cargo build -p flotilla-runner) or pass --runner-bin"
    )]
    NoRunner(String),
    #[error(
        "runtime vllm needs the `vllm` executable and there is none ({0}); install vLLM or pass --vllm-bin"
    )]
    NoVllm(String),
    #[error("starting the replica: no free port: {0}")]
    NoPort(#[source] std::io::Error),
    #[error("starting the replica: {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the replica did not become healthy within {0:?}: {1}")]
    NotReady(Duration, String),
    #[error("the replica failed: {0}")]
    Failed(String),
    #[error("Kubernetes API: {0}")]
    Kubernetes(#[source] kube::Error),
}

/// What a backend needs to run one replica.
#[derive(Debug, Clone, Default)]
pub struct ReplicaSpec {
    pub replica_id: String,
    pub deployment: String,
    pub generation: u64,
    /// The name the server answers to on `/v1/*`.
    pub model_name: String,
    /// The model on this machine: the file of a one-part model, else the
    /// model's folder in the cache.
    pub model_path: PathBuf,
    /// The same, relative to the model cache's root (where a Kubernetes
    /// pod mounts the cache volume).
    pub model_in_cache: PathBuf,
    pub runtime: v1::Runtime,
    /// GPUs one replica gets (`nvidia.com/gpu` on Kubernetes).
    pub gpus: u32,
    pub tolerations: Vec<v1::Toleration>,
    pub node_selector: BTreeMap<String, String>,
    /// Placement's sizing: `gpus` split into `pipeline_parallel` stages
    /// (nodes) of `tensor_parallel` GPUs each; 0 counts as 1.
    pub tensor_parallel: u32,
    pub pipeline_parallel: u32,
    /// The GPU model placement sized for (`H100-80GB`); empty: any.
    pub gpu_model: String,
    /// The `nvidia.com/gpu.product` values of this cluster's nodes whose
    /// GPUs are `gpu_model`: pods are kept to those nodes. Filled by the
    /// Kubernetes backend from its node inventory; empty: no constraint.
    pub gpu_products: Vec<String>,
    /// The model's digest (`sha256:<hex>`) as the model store has it.
    pub model_digest: String,
    /// Image, engine arguments, environment, resources and node selection
    /// of the deployment.
    pub engine: v1::EngineSpec,
    pub drift_policy: v1::DriftPolicy,
}

/// What an executor that restarted finds of a replica its KV record says
/// it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// Running, of the recorded generation, serving the recorded model:
    /// this executor runs it again. Its base URL.
    Adopted(String),
    /// Nothing of it runs any more; why.
    Gone(String),
    /// Something ran under its name that could not be vouched for (wrong
    /// generation or model, not answering); it has been stopped. Why.
    Refused(String),
}

/// A replica that stopped serving on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaFailure {
    pub replica_id: String,
    pub reason: String,
}

/// A replica still serving, at another base URL than before (a pod
/// re-created on another node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub replica_id: String,
    pub endpoint: String,
}

/// How a starting replica is getting on, in the words of what runs it
/// (Kubernetes' `Unschedulable` and the scheduler's message, `Scheduled`,
/// `ContainerCreating`): reported once per change of `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub replica_id: String,
    pub reason: String,
    pub message: String,
}

/// A replica's object changed or went by another hand than the
/// executor's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub replica_id: String,
    /// What differs from what was sent, one line each
    /// (`spec.template.spec.containers[0].image: "a" != "b"`,
    /// `deleted`).
    pub differences: Vec<String>,
    /// Whether the backend put it back (drift policy take-over) or left it
    /// (report-only); `Err` when putting it back failed, why.
    pub restored: Result<bool, String>,
}

/// What a backend saw of its replicas since it last looked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observation {
    /// Replicas that stopped serving (a process that exited, a pod that
    /// failed); they are no longer run.
    pub failed: Vec<ReplicaFailure>,
    /// Replicas that serve somewhere else now; the backend already routes
    /// its own calls there.
    pub moved: Vec<Moved>,
    /// Starting replicas that got on (or got stuck) since the last call.
    pub progress: Vec<Progress>,
    /// Replicas whose objects were changed or deleted by hand.
    pub drifted: Vec<Drift>,
}

/// Starts, stops and watches replicas. Implementations keep, in memory,
/// which replicas they run; after a restart [`adopt`](Self::adopt) rebuilds
/// that from what is really running, and
/// [`stop_unknown`](Self::stop_unknown) stops what nobody recorded.
pub trait ReplicaBackend: Send + Sync + 'static {
    /// `local` or `kubernetes`, for logs and messages.
    fn name(&self) -> &'static str;

    /// Starts a replica and waits until it serves; returns its base URL.
    fn start(
        &self,
        spec: &ReplicaSpec,
    ) -> impl Future<Output = Result<String, BackendError>> + Send;

    /// Stops a replica; `Ok(false)` when this backend did not run it.
    fn stop(&self, replica_id: &str) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Stops a replica that is already out of routing, letting it finish
    /// the requests it serves first: asked to stop (SIGTERM, which the
    /// runner and vLLM answer by refusing new connections and completing
    /// the open ones), stopped by force after `grace`. By default, as
    /// [`stop`](Self::stop): a pod's own termination grace does the same.
    fn drain_and_stop(
        &self,
        replica_id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        let _ = grace;
        self.stop(replica_id)
    }

    /// Whether the replicas fetch their model themselves (pods filling a
    /// node cache), so the executor need not hold a copy of it.
    fn fetches_models(&self) -> bool {
        false
    }

    /// Whether its replicas answer HTTP (`/health`, `/metrics`) at their
    /// endpoints, to be probed and sampled.
    fn serves_http(&self) -> bool {
        true
    }

    /// Whether this backend runs the replica now (started or adopted).
    fn runs(&self, replica_id: &str) -> bool;

    /// What changed of its replicas since the last call: those that
    /// stopped serving, those that serve at a new address, how starting
    /// ones get on and which were changed by hand.
    fn observe(&self) -> impl Future<Output = Observation> + Send;

    /// Finds the replica `recorded` describes after this executor
    /// restarted, and runs it again when it can vouch for it.
    fn adopt(&self, recorded: &ReplicaStatus) -> impl Future<Output = Adoption> + Send;

    /// Stops every replica of this executor that is not in `known`
    /// (started by an earlier instance that died before recording it);
    /// returns their ids.
    fn stop_unknown(&self, known: &HashSet<String>) -> impl Future<Output = Vec<String>> + Send;

    /// The executor is exiting. `handover`: a next instance will adopt
    /// what runs, so leave it serving; otherwise stop what this backend
    /// can stop. Replicas that are pods outlive the executor either way,
    /// hence the default.
    fn exit(&self, handover: bool) -> impl Future<Output = ()> + Send {
        let _ = handover;
        async {}
    }
}
