//! The replica half of the executor: start and stop commands for this
//! cluster, one [`ReplicaBackend`] that runs replicas, their state in KV
//! `replicas` (this cluster's keys only) and `replica.*` events.
//!
//! Fencing: every command carries its placement generation; a command older
//! than the newest generation this executor has seen for the deployment is
//! acknowledged and ignored. The newest generations are rebuilt at start
//! from this cluster's starting and ready replicas in KV, so a restart
//! does not forget them.
//!
//! Restart: before it consumes a command, [`Replicas::reconcile`] reads this
//! cluster's records and asks the backend to adopt every replica recorded
//! as starting or ready; what it cannot vouch for is stopped and a ready
//! one reported failed, and replicas nobody recorded are stopped. A start
//! for a replica the backend already runs does nothing, so a redelivered
//! command never makes a second one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::object_store::ObjectStore;
use flotilla_kit::{
    Backoff, Bus, ConsumerSpec, Delivery, EventDraft, HandlerError, KitError, RecordStore,
    now_unix_ms, spawn_consumer, sync,
};
use flotilla_model_store::ModelCache;
use flotilla_proto::v1::{
    self, ModelPhase, ModelRecord, ReplicaPhase, ReplicaStatus, event::Payload,
    executor_command::Action,
};
use flotilla_proto::{CommandAction, EventType};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backends::{Adoption, ReplicaBackend, ReplicaSpec};
use crate::replica_client::ReplicaClient;

mod probe;

/// How often ready replicas are probed.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// Waits between tries to reconcile with KV before commands are consumed.
const RECONCILE_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_secs(10));

pub struct Replicas<B: ReplicaBackend> {
    pub bus: Bus,
    pub cluster: String,
    pub region: String,
    pub backend: B,
    pub cache: Arc<ModelCache>,
    pub store: ObjectStore,
    pub models: RecordStore<ModelRecord>,
    pub replicas: RecordStore<ReplicaStatus>,
    /// Newest placement generation seen per deployment (fencing).
    pub generations: Mutex<HashMap<String, u64>>,
    /// Replicas whose start is in progress here: a second start for one
    /// of them waits for nothing and starts nothing.
    pub starting: Mutex<HashSet<String>>,
    /// Consecutive failed health probes per ready replica.
    pub probe_failures: Mutex<HashMap<String, u32>>,
    pub client: ReplicaClient,
}

/// Removes a replica from [`Replicas::starting`] however its start ends.
struct StartingGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    replica_id: String,
}

impl Drop for StartingGuard<'_> {
    fn drop(&mut self) {
        sync::lock(self.set).remove(&self.replica_id);
    }
}

impl<B: ReplicaBackend> Replicas<B> {
    /// The replica half of `cluster` over `backend`, with its KV buckets
    /// opened.
    pub async fn open(
        bus: Bus,
        cluster: String,
        region: String,
        backend: B,
        cache: Arc<ModelCache>,
        store: ObjectStore,
    ) -> Result<Self, KitError> {
        let models = RecordStore::open(&bus, &bus.topology.models.name).await?;
        let replicas = RecordStore::open(&bus, &bus.topology.replicas.name).await?;
        Ok(Self {
            bus,
            cluster,
            region,
            backend,
            cache,
            store,
            models,
            replicas,
            generations: Mutex::default(),
            starting: Mutex::default(),
            probe_failures: Mutex::default(),
            client: ReplicaClient::default(),
        })
    }

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
        let mut seen = sync::lock(&self.generations);
        let newest = seen.entry(deployment.to_string()).or_insert(0);
        if generation < *newest {
            return true;
        }
        *newest = generation;
        false
    }

    /// This cluster's records in KV `replicas`.
    async fn own_records(&self) -> Result<Vec<ReplicaStatus>, KitError> {
        Ok(self
            .replicas
            .list()
            .await?
            .into_iter()
            .filter(|r| r.cluster == self.cluster)
            .collect())
    }

    /// Makes what runs match KV after a (re)start: adopts every replica
    /// recorded as starting or ready that the backend can vouch for,
    /// reports the ready ones it cannot as failed, stops replicas nobody
    /// recorded, and remembers the newest generation per deployment of its
    /// live replicas.
    ///
    /// A replica recorded as starting that is not running stays starting:
    /// its start command was never acknowledged, so it comes again and
    /// starts it.
    pub async fn reconcile(&self) -> Result<(), KitError> {
        let records = self.own_records().await?;
        {
            let mut seen = sync::lock(&self.generations);
            // Live replicas only: a deployment deleted and applied again
            // starts over at generation 1, and its stopped replicas must
            // not fence it.
            for r in records
                .iter()
                .filter(|r| matches!(r.phase(), ReplicaPhase::Ready | ReplicaPhase::Starting))
            {
                let newest = seen.entry(r.deployment.clone()).or_insert(0);
                *newest = (*newest).max(r.generation);
            }
        }
        let mut known = HashSet::new();
        for mut status in records {
            let phase = status.phase();
            if !matches!(phase, ReplicaPhase::Ready | ReplicaPhase::Starting) {
                continue;
            }
            known.insert(status.replica_id.clone());
            let id = status.replica_id.clone();
            match self.backend.adopt(&status).await {
                Adoption::Adopted(endpoint) => {
                    if phase == ReplicaPhase::Ready && status.endpoint == endpoint {
                        continue;
                    }
                    status.phase = ReplicaPhase::Ready.into();
                    status.endpoint = endpoint.clone();
                    status.message = "serving (adopted after an executor restart)".into();
                    status.updated_at_unix_ms = now_unix_ms();
                    self.record(
                        status,
                        EventType::ReplicaReady,
                        format!("replica {id} ready at {endpoint} (adopted)"),
                        "",
                    )
                    .await?;
                }
                Adoption::Gone(why) | Adoption::Refused(why) if phase == ReplicaPhase::Ready => {
                    tracing::warn!(replica = %id, "{why}");
                    status.phase = ReplicaPhase::Failed.into();
                    status.endpoint.clear();
                    status.message.clone_from(&why);
                    status.updated_at_unix_ms = now_unix_ms();
                    self.record(
                        status,
                        EventType::ReplicaFailed,
                        format!("replica {id} failed: {why}"),
                        "",
                    )
                    .await?;
                }
                Adoption::Gone(why) | Adoption::Refused(why) => {
                    tracing::info!(replica = %id, "{why}; its start command will start it");
                }
            }
        }
        let stray = self.backend.stop_unknown(&known).await;
        if !stray.is_empty() {
            tracing::info!(?stray, "stopped replicas no record knows");
        }
        Ok(())
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
                // Its own span: a start outlives most messages (a fetch, a
                // load) and its lines are looked up by replica.
                let span = tracing::info_span!(
                    "replica_start",
                    deployment = %c.deployment,
                    cluster = %self.cluster,
                    replica = %start.replica_id,
                    generation = c.generation,
                );
                self.start(&c.deployment, c.generation, start, &c.command_id, shutdown)
                    .instrument(span)
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
        if self.backend.runs(&start.replica_id) {
            // A redelivered start: the replica runs.
            return Ok(());
        }
        let Some(_starting) = self.claim_start(&start.replica_id) else {
            // The same start is in progress.
            return Ok(());
        };
        let model = start.model.clone().unwrap_or_default();
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
                "replica {} of {deployment} starting on {} ({})",
                start.replica_id,
                self.cluster,
                self.backend.name()
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
        // A one-file model (its parts are pieces of that file) is served as
        // the file; a model of several files as its folder.
        let files: std::collections::BTreeSet<&str> =
            record.parts.iter().map(|p| p.file.as_str()).collect();
        let model_path = match files.into_iter().collect::<Vec<_>>().as_slice() {
            [one] => fetched.path.join(one),
            _ => fetched.path.clone(),
        };
        let model_in_cache = model_path
            .strip_prefix(self.cache.dir())
            .map(std::path::Path::to_path_buf)
            .unwrap_or_else(|_| model_path.clone());
        let gpu = start.gpu.clone().unwrap_or_default();
        let spec = ReplicaSpec {
            replica_id: start.replica_id.clone(),
            deployment: deployment.to_string(),
            generation,
            model_name: record.name.clone(),
            model_path,
            model_in_cache,
            runtime: start.runtime(),
            gpus: gpu.count,
            tolerations: start.tolerations.clone(),
            node_selector: start.node_selector.clone(),
            tensor_parallel: start.tensor_parallel,
            pipeline_parallel: start.pipeline_parallel,
            gpu_model: start.gpu_model.clone(),
            model_digest: record.digest.clone(),
            engine: start.engine.clone().unwrap_or_default(),
            drift_policy: start.drift_policy(),
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

    fn claim_start(&self, replica_id: &str) -> Option<StartingGuard<'_>> {
        let mut set = sync::lock(&self.starting);
        set.insert(replica_id.to_string()).then(|| StartingGuard {
            set: &self.starting,
            replica_id: replica_id.to_string(),
        })
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
        self.backend
            .stop(&stop.replica_id)
            .await
            .map_err(HandlerError::retry)?;
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
        .map_err(HandlerError::retry)?;
        // Its last replica here gone (a delete): forget its generation, so
        // the same name applied again, which starts over at generation 1,
        // is not fenced off.
        let still_live = self.own_records().await.map_or(true, |records| {
            records.iter().any(|r| {
                r.deployment == deployment
                    && matches!(r.phase(), ReplicaPhase::Ready | ReplicaPhase::Starting)
            })
        });
        if !still_live {
            sync::lock(&self.generations).remove(deployment);
        }
        Ok(())
    }

    async fn report_failed(&self, replica_id: &str, why: &str) {
        if let Ok(Some((mut status, _))) = self.replicas.get(&self.key(replica_id)).await {
            if status.phase() == ReplicaPhase::Stopped {
                return;
            }
            status.phase = ReplicaPhase::Failed.into();
            status.endpoint.clear();
            status.message = why.to_string();
            status.updated_at_unix_ms = now_unix_ms();
            let _ = self
                .record(
                    status,
                    EventType::ReplicaFailed,
                    format!("replica {replica_id} failed: {why}"),
                    "",
                )
                .await;
        }
    }

    /// Reports replicas the backend saw stop serving (a process exited, a
    /// pod failed) or serve somewhere else (a pod re-created on another
    /// node).
    pub async fn watch_exits(&self) {
        let seen = self.backend.observe().await;
        for failure in seen.failed {
            self.report_failed(&failure.replica_id, &failure.reason)
                .await;
        }
        for moved in seen.moved {
            self.record_moved(&moved.replica_id, moved.endpoint).await;
        }
    }

    /// A ready replica now serves at `endpoint`: KV says so, and the
    /// gateway (which watches KV) routes there.
    async fn record_moved(&self, replica_id: &str, endpoint: String) {
        let moved = self
            .replicas
            .update(&self.key(replica_id), |current| {
                let mut status = current?.clone();
                if status.phase() != ReplicaPhase::Ready || status.endpoint == endpoint {
                    return None;
                }
                status.endpoint = endpoint.clone();
                status.updated_at_unix_ms = now_unix_ms();
                Some(status)
            })
            .await;
        match moved {
            Ok(Some(_)) => {
                tracing::info!(replica = %replica_id, %endpoint, "the replica serves from a new address")
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(replica = %replica_id, "recording the new address: {e}"),
        }
    }
}

/// Reconciles with KV, then consumes `<prefix>.cmd.<cluster>.start|stop`
/// until `shutdown`, watching and probing what runs.
/// On `shutdown`, the backend's replicas are handed over to a next
/// instance when `handover`, stopped otherwise.
pub fn spawn<B: ReplicaBackend>(
    replicas: Arc<Replicas<B>>,
    handover: bool,
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
    // A long start or fetch stays claimed by progress acks (every third of
    // this); the command of a killed executor goes to its successor after
    // at most this long.
    spec.ack_wait = crate::COMMAND_ACK_WAIT;
    Ok(tokio::spawn(async move {
        // Commands wait until what runs matches KV, so none acts on a
        // replica an earlier instance left behind.
        let mut failures = 0u32;
        loop {
            match replicas.reconcile().await {
                Ok(()) => break,
                Err(e) => tracing::warn!("reconciling replicas with KV: {e}; retrying"),
            }
            failures = failures.saturating_add(1);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RECONCILE_BACKOFF.delay(failures)) => {}
            }
        }
        let watcher = {
            let (r, stop) = (replicas.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut probe = tokio::time::interval(PROBE_EVERY);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => r.watch_exits().await,
                        _ = probe.tick() => r.probe_ready().await,
                    }
                }
            })
        };
        let consumer = spawn_consumer(
            &bus,
            spec,
            (replicas.clone(), shutdown.clone()),
            |(r, stop), d: Delivery<v1::ExecutorCommand>| async move { r.handle(d, &stop).await },
            shutdown,
        );
        if let Ok(Err(e)) = consumer.await {
            tracing::error!("replica consumer: {e}");
        }
        let _ = watcher.await;
        replicas.backend.exit(handover).await;
    }))
}
