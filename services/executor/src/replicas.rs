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
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backends::{Adoption, ReplicaBackend, ReplicaSpec};
use crate::replica_client::ReplicaClient;

/// Consecutive failed `/health` probes after which a ready replica is
/// reported failed and stopped.
const PROBE_FAILURES_ALLOWED: u32 = 3;
/// How often ready replicas are probed.
const PROBE_EVERY: Duration = Duration::from_secs(5);

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
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.replica_id);
        }
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
        if let Ok(mut seen) = self.generations.lock() {
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
        let mut set = self.starting.lock().ok()?;
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
        if !still_live && let Ok(mut seen) = self.generations.lock() {
            seen.remove(deployment);
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
    /// pod failed).
    pub async fn watch_exits(&self) {
        for failure in self.backend.observe().await {
            self.report_failed(&failure.replica_id, &failure.reason)
                .await;
        }
        for (replica_id, endpoint) in self.backend.take_moved() {
            self.record_moved(&replica_id, endpoint).await;
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

    /// Probes `/health` of every ready replica this executor runs; one
    /// that fails [`PROBE_FAILURES_ALLOWED`] probes in a row is stopped and
    /// reported failed, so the rollout replaces it.
    pub async fn probe_ready(&self) {
        let Ok(records) = self.own_records().await else {
            return;
        };
        for status in records {
            if status.phase() != ReplicaPhase::Ready || !self.backend.runs(&status.replica_id) {
                continue;
            }
            let id = status.replica_id.clone();
            let failures = match self.client.health(&status.endpoint).await {
                Ok(()) => 0,
                Err(e) => {
                    tracing::debug!(replica = %id, "health probe: {e}");
                    self.probe_failures
                        .lock()
                        .map(|f| f.get(&id).copied().unwrap_or(0) + 1)
                        .unwrap_or(1)
                }
            };
            if let Ok(mut f) = self.probe_failures.lock() {
                if failures == 0 {
                    f.remove(&id);
                } else {
                    f.insert(id.clone(), failures);
                }
            }
            if failures >= PROBE_FAILURES_ALLOWED {
                let _ = self.backend.stop(&id).await;
                if let Ok(mut f) = self.probe_failures.lock() {
                    f.remove(&id);
                }
                self.report_failed(
                    &id,
                    &format!("{failures} health probes in a row failed; stopped"),
                )
                .await;
            }
        }
    }
}

/// Reconciles with KV, then consumes `<prefix>.cmd.<cluster>.start|stop`
/// until `shutdown`, watching and probing what runs.
pub fn spawn<B: ReplicaBackend>(
    replicas: Arc<Replicas<B>>,
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
        let mut wait = Duration::from_millis(200);
        loop {
            match replicas.reconcile().await {
                Ok(()) => break,
                Err(e) => tracing::warn!("reconciling replicas with KV: {e}; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(10));
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
