//! The replica half of the executor: start and stop commands for this
//! cluster, one backend that runs replicas, their state in KV `replicas`
//! (this cluster's keys only) and `replica.*` events.
//!
//! Fencing: every command carries its placement generation; a command older
//! than the newest generation this executor has seen for the deployment is
//! acknowledged and ignored.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::object_store::ObjectStore;
use flotilla_kit::consumer::run_consumer;
use flotilla_kit::{
    Bus, ConsumerSpec, Delivery, EventDraft, HandlerError, KitError, RecordStore, now_unix_ms,
};
use flotilla_model_store::ModelCache;
use flotilla_proto::v1::{
    self, ModelPhase, ModelRecord, ReplicaPhase, ReplicaStatus, event::Payload,
    executor_command::Action,
};
use flotilla_proto::{CommandAction, EventType};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a new replica may take to answer `/health`.
const READY_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "runner binary {0} not found; build it (cargo build -p flotilla-runner) or pass --runner-bin"
    )]
    NoRunner(String),
    #[error("starting the runner: {0}")]
    Spawn(String),
    #[error("the replica did not become healthy within {0:?}: {1}")]
    NotReady(Duration, String),
}

/// What a backend needs to run one replica.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    pub replica_id: String,
    pub model_name: String,
    pub model_path: PathBuf,
}

/// Runs replicas as local `flotilla-runner` processes on free ports.
pub struct LocalBackend {
    runner: PathBuf,
    children: Mutex<HashMap<String, Child>>,
    /// The same client code serves the candle runner and vLLM: their
    /// `/health` and `/v1/*` paths match.
    http: reqwest::Client,
}

/// The runner next to this executor's binary, or on PATH.
pub fn find_runner(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("flotilla-runner");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("flotilla-runner"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from("flotilla-runner"))
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl LocalBackend {
    pub fn new(runner: PathBuf) -> Self {
        Self {
            runner,
            children: Mutex::new(HashMap::new()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
        }
    }

    /// Starts a runner and waits until `/health` answers 200; returns its
    /// base URL.
    pub async fn start(&self, spec: &ReplicaSpec) -> Result<String, BackendError> {
        if !self.runner.is_file() {
            return Err(BackendError::NoRunner(self.runner.display().to_string()));
        }
        let port = free_port().map_err(|e| BackendError::Spawn(e.to_string()))?;
        let addr = format!("127.0.0.1:{port}");
        let mut child = Command::new(&self.runner)
            .arg("--model")
            .arg(&spec.model_path)
            .args(["--served-model-name", &spec.model_name, "--addr", &addr])
            .env("FLOTILLA_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BackendError::Spawn(e.to_string()))?;
        let started = Instant::now();
        let mut last: String;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BackendError::NotReady(
                    started.elapsed(),
                    format!("the runner exited ({status})"),
                ));
            }
            match self.http.get(format!("http://{addr}/health")).send().await {
                Ok(r) if r.status() == 200 => break,
                Ok(r) => last = format!("/health answered {}", r.status()),
                Err(e) => last = e.to_string(),
            }
            if started.elapsed() > READY_DEADLINE {
                let _ = child.kill().await;
                return Err(BackendError::NotReady(READY_DEADLINE, last));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Ok(mut children) = self.children.lock() {
            children.insert(spec.replica_id.clone(), child);
        }
        Ok(format!("http://{addr}"))
    }

    /// Stops a replica; `false` when this backend does not run it.
    pub async fn stop(&self, replica_id: &str) -> bool {
        let child = self
            .children
            .lock()
            .ok()
            .and_then(|mut c| c.remove(replica_id));
        match child {
            Some(mut child) => {
                let _ = child.kill().await;
                true
            }
            None => false,
        }
    }

    /// Replicas whose process has exited, with why.
    pub fn exited(&self) -> Vec<(String, String)> {
        let Ok(mut children) = self.children.lock() else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        children.retain(|id, child| match child.try_wait() {
            Ok(Some(status)) => {
                gone.push((id.clone(), format!("the runner exited ({status})")));
                false
            }
            _ => true,
        });
        gone
    }
}

pub struct Replicas {
    pub bus: Bus,
    pub cluster: String,
    pub region: String,
    pub backend: LocalBackend,
    pub cache: Arc<ModelCache>,
    pub store: ObjectStore,
    pub models: RecordStore<ModelRecord>,
    pub replicas: RecordStore<ReplicaStatus>,
    /// Newest placement generation seen per deployment (fencing).
    pub generations: Mutex<HashMap<String, u64>>,
}

impl Replicas {
    fn key(&self, replica_id: &str) -> String {
        format!("{}.{replica_id}", self.cluster)
    }

    async fn record(
        &self,
        status: ReplicaStatus,
        ty: EventType,
        message: String,
        correlation: &str,
    ) -> Result<(), KitError> {
        let key = self.key(&status.replica_id);
        self.replicas.update(&key, |_| Some(status.clone())).await?;
        let draft = EventDraft::new(ty, &status.replica_id, message)
            .generation(status.generation)
            .correlation_id(correlation)
            .payload(Payload::Replica(status));
        self.bus.publish_event(draft).await
    }

    /// Whether a command of `generation` for `deployment` is current.
    fn fenced(&self, deployment: &str, generation: u64) -> bool {
        let Ok(mut seen) = self.generations.lock() else {
            return false;
        };
        let newest = seen.entry(deployment.to_string()).or_insert(0);
        if generation < *newest {
            return true;
        }
        *newest = generation;
        false
    }

    pub async fn handle(
        &self,
        d: Delivery<v1::ExecutorCommand>,
        shutdown: &CancellationToken,
    ) -> Result<(), HandlerError> {
        let c = d.message;
        if c.cluster != self.cluster {
            return Err(HandlerError::invalid(
                "cluster",
                format!("{:?} is not this cluster ({})", c.cluster, self.cluster),
            ));
        }
        flotilla_proto::check_name("deployment", &c.deployment)
            .map_err(|e| HandlerError::invalid("deployment", e.to_string()))?;
        if self.fenced(&c.deployment, c.generation) {
            tracing::info!(deployment = %c.deployment, generation = c.generation, "command from an older placement generation ignored");
            return Ok(());
        }
        match c.action {
            Some(Action::Start(start)) => {
                self.start(&c.deployment, c.generation, start, &c.command_id, shutdown)
                    .await
            }
            Some(Action::Stop(stop)) => {
                self.stop(&c.deployment, c.generation, stop, &c.command_id)
                    .await
            }
            _ => Err(HandlerError::invalid("action", "expected start or stop")),
        }
    }

    async fn start(
        &self,
        deployment: &str,
        generation: u64,
        start: v1::StartReplica,
        correlation: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), HandlerError> {
        flotilla_proto::check_name("replica", &start.replica_id)
            .map_err(|e| HandlerError::invalid("action.start.replica_id", e.to_string()))?;
        if let Some((existing, _)) = self
            .replicas
            .get(&self.key(&start.replica_id))
            .await
            .map_err(HandlerError::retry)?
            && matches!(
                existing.phase(),
                ReplicaPhase::Ready | ReplicaPhase::Starting
            )
        {
            // A redelivered start: the replica exists.
            return Ok(());
        }
        let model = start.model.unwrap_or_default();
        let Some((record, _)) = self
            .models
            .get(&model.name)
            .await
            .map_err(HandlerError::retry)?
        else {
            return Err(HandlerError::invalid(
                "action.start.model.name",
                format!("no model named {:?}", model.name),
            ));
        };
        if record.phase() != ModelPhase::Ready {
            return Err(HandlerError::retry(format!(
                "model {} is not ready yet",
                record.name
            )));
        }
        let mut status = ReplicaStatus {
            replica_id: start.replica_id.clone(),
            cluster: self.cluster.clone(),
            deployment: deployment.to_string(),
            generation,
            phase: ReplicaPhase::Starting.into(),
            model: record.name.clone(),
            region: self.region.clone(),
            runtime: start.runtime,
            updated_at_unix_ms: now_unix_ms(),
            message: "fetching the model".into(),
            ..Default::default()
        };
        self.record(
            status.clone(),
            EventType::ReplicaStarting,
            format!(
                "replica {} of {deployment} starting on {}",
                start.replica_id, self.cluster
            ),
            correlation,
        )
        .await
        .map_err(HandlerError::retry)?;
        let fetched = match self
            .cache
            .fetch(&self.store, &record, shutdown, |_| {})
            .await
        {
            Ok(f) => f,
            Err(e) if e.is_transient() => return Err(HandlerError::retry(e)),
            Err(e) => {
                status.phase = ReplicaPhase::Failed.into();
                status.message = e.to_string();
                return self
                    .record(status, EventType::ReplicaFailed, e.to_string(), correlation)
                    .await
                    .map_err(HandlerError::retry);
            }
        };
        let file = record
            .parts
            .first()
            .map(|p| p.file.clone())
            .unwrap_or_default();
        let spec = ReplicaSpec {
            replica_id: start.replica_id.clone(),
            model_name: record.name.clone(),
            model_path: fetched.path.join(file),
        };
        match self.backend.start(&spec).await {
            Ok(endpoint) => {
                status.phase = ReplicaPhase::Ready.into();
                status.endpoint = endpoint.clone();
                status.message = "serving".into();
                status.updated_at_unix_ms = now_unix_ms();
                self.record(
                    status,
                    EventType::ReplicaReady,
                    format!(
                        "replica {} of {deployment} ready at {endpoint}",
                        start.replica_id
                    ),
                    correlation,
                )
                .await
                .map_err(HandlerError::retry)
            }
            Err(e) => {
                status.phase = ReplicaPhase::Failed.into();
                status.message = e.to_string();
                status.updated_at_unix_ms = now_unix_ms();
                self.record(
                    status,
                    EventType::ReplicaFailed,
                    format!("replica {} failed: {e}", start.replica_id),
                    correlation,
                )
                .await
                .map_err(HandlerError::retry)
            }
        }
    }

    async fn stop(
        &self,
        deployment: &str,
        generation: u64,
        stop: v1::StopReplica,
        correlation: &str,
    ) -> Result<(), HandlerError> {
        let key = self.key(&stop.replica_id);
        let Some((mut status, _)) = self.replicas.get(&key).await.map_err(HandlerError::retry)?
        else {
            return Err(HandlerError::invalid(
                "action.stop.replica_id",
                format!("no replica {:?} on {}", stop.replica_id, self.cluster),
            ));
        };
        if status.deployment != deployment {
            return Err(HandlerError::invalid(
                "deployment",
                format!(
                    "replica {} belongs to {}",
                    stop.replica_id, status.deployment
                ),
            ));
        }
        if status.phase() == ReplicaPhase::Stopped {
            return Ok(());
        }
        self.backend.stop(&stop.replica_id).await;
        status.phase = ReplicaPhase::Stopped.into();
        status.endpoint.clear();
        status.generation = status.generation.max(generation);
        status.message = if stop.reason.is_empty() {
            "stopped".into()
        } else {
            stop.reason.clone()
        };
        status.updated_at_unix_ms = now_unix_ms();
        self.record(
            status,
            EventType::ReplicaStopped,
            format!("replica {} of {deployment} stopped", stop.replica_id),
            correlation,
        )
        .await
        .map_err(HandlerError::retry)
    }

    /// Reports replicas whose process died.
    pub async fn watch_exits(&self) {
        for (id, why) in self.backend.exited() {
            if let Ok(Some((mut status, _))) = self.replicas.get(&self.key(&id)).await {
                status.phase = ReplicaPhase::Failed.into();
                status.endpoint.clear();
                status.message.clone_from(&why);
                status.updated_at_unix_ms = now_unix_ms();
                let _ = self
                    .record(
                        status,
                        EventType::ReplicaFailed,
                        format!("replica {id} failed: {why}"),
                        "",
                    )
                    .await;
            }
        }
    }
}

/// Consumes `<prefix>.cmd.<cluster>.start|stop` until `shutdown`.
pub fn spawn(
    replicas: Arc<Replicas>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, KitError> {
    let bus = replicas.bus.clone();
    let cluster = replicas.cluster.clone();
    let mut spec = ConsumerSpec::new(
        &bus.topology.commands.name,
        &format!("executor-{cluster}-replicas"),
        vec![
            bus.subjects.command(&cluster, CommandAction::Start)?,
            bus.subjects.command(&cluster, CommandAction::Stop)?,
        ],
    );
    spec.max_deliveries = 25;
    spec.max_backoff = Duration::from_secs(30);
    spec.ack_wait = Duration::from_secs(60);
    let watcher = {
        let (r, stop) = (replicas.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => r.watch_exits().await,
                }
            }
        })
    };
    Ok(tokio::spawn(async move {
        let handler_r = replicas.clone();
        let handler_stop = shutdown.clone();
        let handler = move |d: Delivery<v1::ExecutorCommand>| {
            let (r, stop) = (handler_r.clone(), handler_stop.clone());
            async move { r.handle(d, &stop).await }
        };
        if let Err(e) = run_consumer(&bus, spec, handler, shutdown).await {
            tracing::error!("replica consumer: {e}");
        }
        let _ = watcher.await;
    }))
}
