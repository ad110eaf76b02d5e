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
//! Concurrency: up to `--max-concurrent-starts` commands are handled at
//! once (the kit's consumer runs that many handlers), so a replica whose
//! pod never becomes ready does not hold up the others. Commands for one
//! replica stay in order where it matters: a stop cancels that replica's
//! start in progress and waits for it to let go; a stop that overtakes
//! the start it ends (handled first) records the replica stopped and the
//! start, when it comes, does nothing. Every change of a record
//! (starting, ready, failed, stopped) is made under one lock, so a stop
//! and a start or a failure report never overwrite each other.
//!
//! Restart: before it consumes a command, [`Replicas::reconcile`] reads this
//! cluster's records and asks the backend to adopt every replica recorded
//! as starting or ready; what it cannot vouch for is stopped and a ready
//! one reported failed, and replicas nobody recorded are stopped. A start
//! for a replica the backend already runs does nothing, so a redelivered
//! command never makes a second one; nor does one delivered again after its
//! replica was stopped (its acknowledgement lost with a server): a start
//! names the ended record it replaces, and finding another ended record
//! it starts nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

use crate::backends::{Adoption, Drift, Progress, ReplicaBackend, ReplicaSpec};
use crate::load::GpuHolds;
use crate::replica_client::ReplicaClient;

mod probe;

/// How often ready replicas are probed.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// Waits between tries to reconcile with KV before commands are consumed.
const RECONCILE_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
/// How long a stop that came before its start is remembered: its start,
/// handled after it, is due within moments (the two were consumed
/// together).
const STOPPED_EARLY_FOR: Duration = Duration::from_secs(600);
/// The longest wait before a failed command is tried again.
const COMMAND_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Commands handled at once, by default.
pub const DEFAULT_MAX_CONCURRENT_STARTS: usize = 8;

/// Whether a record is of a replica's life that ended.
fn ended(phase: ReplicaPhase) -> bool {
    matches!(
        phase,
        ReplicaPhase::Stopped | ReplicaPhase::Stopping | ReplicaPhase::Failed
    )
}

/// A start in progress: cancelled by a stop of the same replica, `done`
/// once the start let go of it.
#[derive(Clone)]
pub struct StartClaim {
    deployment: String,
    /// The start command that holds it.
    command_id: String,
    cancel: CancellationToken,
    done: CancellationToken,
}

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
    /// Replicas whose start is in progress here: the same start command
    /// again starts nothing, another start command waits until the first
    /// let go; a stop cancels it.
    pub starting: Mutex<HashMap<String, StartClaim>>,
    /// Stops handled before their start (no record, no start under way):
    /// the start, when it comes, starts nothing.
    pub stopped_early: Mutex<HashMap<String, Instant>>,
    /// Held while a record changes phase, so concurrent commands and
    /// failure reports do not overwrite each other's.
    pub transitions: tokio::sync::Mutex<()>,
    /// GPUs held by the replicas started here.
    pub holds: Arc<GpuHolds>,
    /// Consecutive failed health probes per ready replica.
    pub probe_failures: Mutex<HashMap<String, u32>>,
    pub client: ReplicaClient,
    /// How a ready replica leaves: see [`Drain`].
    pub drain: Drain,
}

/// The default of `--drain-timeout`, as Kubernetes' termination grace.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replica recorded `Stopping` keeps serving before it is asked
/// to finish: the gateways watch KV `replicas` and see the change within
/// milliseconds; a request one of them routed just before arrives in this.
pub const ROUTING_GRACE: Duration = Duration::from_secs(1);

/// How a ready replica that is asked to stop leaves: recorded `Stopping`
/// (the gateways stop routing to it), given `routing_grace` for every
/// gateway to see that, then asked to finish its requests, and stopped by
/// force after `timeout`. A zero `timeout` stops at once.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    pub timeout: Duration,
    pub routing_grace: Duration,
}

impl Drain {
    /// Stopped at once (simulated clusters, tests of other things).
    pub const NONE: Drain = Drain {
        timeout: Duration::ZERO,
        routing_grace: Duration::ZERO,
    };
}

/// Removes a replica from [`Replicas::starting`] however its start ends,
/// and tells a stop waiting for it.
struct StartingGuard<'a> {
    set: &'a Mutex<HashMap<String, StartClaim>>,
    replica_id: String,
    claim: StartClaim,
}

/// What [`Replicas::claim_start`] found.
enum Claim<'a> {
    /// This start holds the replica now.
    Mine(StartingGuard<'a>),
    /// This very command is already starting it (delivered again).
    Same,
    /// Another command's start of the replica is under way (a start that
    /// is failing, and this the retry its failure brought); `done` once
    /// that one let go.
    Busy(CancellationToken),
}

impl Drop for StartingGuard<'_> {
    fn drop(&mut self) {
        sync::lock(self.set).remove(&self.replica_id);
        self.claim.done.cancel();
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
        shutdown: &CancellationToken,
    ) -> Result<Self, KitError> {
        let models = RecordStore::open(&bus, &bus.topology.models.name).await?;
        models.start_watch(shutdown.clone()).await?;
        let replicas = RecordStore::open(&bus, &bus.topology.replicas.name).await?;
        Ok(Self::over_stores(
            bus, cluster, region, backend, cache, store, models, replicas,
        ))
    }

    /// The replica half of `cluster` over stores already open: simulated
    /// clusters in one process share them (each writes its own keys).
    #[allow(clippy::too_many_arguments)]
    pub fn over_stores(
        bus: Bus,
        cluster: String,
        region: String,
        backend: B,
        cache: Arc<ModelCache>,
        store: ObjectStore,
        models: RecordStore<ModelRecord>,
        replicas: RecordStore<ReplicaStatus>,
    ) -> Self {
        Self {
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
            stopped_early: Mutex::default(),
            transitions: tokio::sync::Mutex::new(()),
            holds: Arc::default(),
            probe_failures: Mutex::default(),
            client: ReplicaClient::default(),
            drain: Drain::NONE,
        }
    }

    /// Ready replicas leave by draining.
    pub fn with_drain(mut self, drain: Drain) -> Self {
        self.drain = drain;
        self
    }

    /// Shares `holds` with the heartbeats.
    pub fn with_holds(mut self, holds: Arc<GpuHolds>) -> Self {
        self.holds = holds;
        self
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
        self.announce(status, ty, message, correlation).await
    }

    /// Records a replica starting, unless its record says a life of it
    /// ended that this start does not replace (`replaces`: when the ended
    /// record it replaces was written, 0 for none). Such a start is stale:
    /// a command delivered again after its replica was stopped, as when
    /// the server lost its acknowledgement. Whether it was recorded.
    async fn record_starting(
        &self,
        status: &ReplicaStatus,
        replaces: i64,
        message: String,
        correlation: &str,
    ) -> Result<bool, KitError> {
        let key = self.key(&status.replica_id);
        let mut stale = false;
        // A first start usually finds no record: it is created without
        // reading the key first.
        let write = |current: Option<&ReplicaStatus>| {
            stale = current.is_some_and(|r| ended(r.phase()) && r.updated_at_unix_ms != replaces);
            (!stale).then(|| status.clone())
        };
        if replaces == 0 {
            self.replicas.update_likely_new(&key, write).await?;
        } else {
            self.replicas.update(&key, write).await?;
        }
        if stale {
            return Ok(false);
        }
        self.announce(
            status.clone(),
            EventType::ReplicaStarting,
            message,
            correlation,
        )
        .await?;
        Ok(true)
    }

    async fn announce(
        &self,
        status: ReplicaStatus,
        ty: EventType,
        message: String,
        correlation: &str,
    ) -> Result<(), KitError> {
        // One id per record written: announced again after a failure, the
        // stream keeps it once.
        let id = format!(
            "replica-{}-{ty}-{}",
            self.key(&status.replica_id),
            status.updated_at_unix_ms
        );
        let draft = EventDraft::new(ty, &status.replica_id, message)
            .id(id)
            .generation(status.generation)
            .correlation_id(correlation)
            .payload(Payload::Replica(status));
        self.bus.publish_event(draft).await
    }

    /// A start for a replica the backend runs already: delivered again, or
    /// tried again because its ready record or event could not be written
    /// (the bus was away). The record is made to say so, and its event
    /// announced again (the stream keeps one), or the replica would stay
    /// starting for everyone else.
    async fn confirm_running(
        &self,
        replica_id: &str,
        correlation: &str,
    ) -> Result<(), HandlerError> {
        let _transition = self.transitions.lock().await;
        let Some((mut status, _)) = self
            .replicas
            .get(&self.key(replica_id))
            .await
            .map_err(HandlerError::retry)?
        else {
            return Ok(());
        };
        let written = match status.phase() {
            ReplicaPhase::Ready => true,
            ReplicaPhase::Starting => {
                let Adoption::Adopted(endpoint) = self.backend.adopt(&status).await else {
                    // Its watch of what runs reports what became of it.
                    return Ok(());
                };
                status.phase = ReplicaPhase::Ready.into();
                status.endpoint = endpoint;
                status.message = "serving".into();
                status.updated_at_unix_ms = now_unix_ms();
                false
            }
            _ => return Ok(()),
        };
        let message = format!(
            "replica {replica_id} of {} ready at {}",
            status.deployment, status.endpoint
        );
        let announced = if written {
            self.announce(status, EventType::ReplicaReady, message, correlation)
                .await
        } else {
            self.record(status, EventType::ReplicaReady, message, correlation)
                .await
        };
        announced.map_err(HandlerError::retry)
    }

    /// The model a start names. A watched copy that says it is ready
    /// spares each start a round trip; any other answer is read from the
    /// server, where a model pushed a moment ago is already ready.
    async fn model(&self, name: &str) -> Result<Option<ModelRecord>, KitError> {
        if let Some(watched) = self.models.cached(name)
            && watched.phase() == ModelPhase::Ready
        {
            return Ok(Some(watched));
        }
        Ok(self.models.get(name).await?.map(|(record, _)| record))
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
        // Keys are `<cluster>.<replica>`: the server picks this cluster's.
        Ok(self
            .replicas
            .list_under(&self.cluster)
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
            if phase == ReplicaPhase::Stopping {
                // A drain an earlier instance began: its stop command was
                // not acknowledged, so it comes again and finishes it.
                known.insert(status.replica_id.clone());
                continue;
            }
            if !matches!(phase, ReplicaPhase::Ready | ReplicaPhase::Starting) {
                continue;
            }
            known.insert(status.replica_id.clone());
            let id = status.replica_id.clone();
            match self.backend.adopt(&status).await {
                Adoption::Adopted(endpoint) => {
                    // What it held before the restart, it holds still.
                    self.holds.hold(&id, status.gpus);
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
            return self.confirm_running(&start.replica_id, correlation).await;
        }
        let starting = loop {
            match self.claim_start(&start.replica_id, deployment, correlation) {
                Claim::Mine(guard) => break guard,
                Claim::Same => return Ok(()),
                // Its failure is recorded before it lets go, so the retry
                // that failure brings can come first: it must not be
                // taken for the same start and dropped.
                Claim::Busy(done) => {
                    tokio::select! {
                        () = done.cancelled() => {}
                        () = shutdown.cancelled() => {
                            return Err(HandlerError::retry("the executor is shutting down"));
                        }
                    }
                    if self.backend.runs(&start.replica_id) {
                        return self.confirm_running(&start.replica_id, correlation).await;
                    }
                }
            }
        };
        let cancel = starting.claim.cancel.clone();
        let model = start.model.clone().unwrap_or_default();
        let Some(record) = self.model(&model.name).await.map_err(HandlerError::retry)? else {
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
        // Pods that fetch the model themselves put it in their node's
        // cache, in the layout of this one: the executor need not hold
        // (or have room for) every model too.
        let in_node_cache = if self.backend.fetches_models() {
            let relative = flotilla_model_store::cache_relative_path(&record.digest);
            Some(relative.ok_or_else(|| {
                HandlerError::invalid(
                    "action.start.model",
                    format!(
                        "model {} has no sha256 digest ({:?})",
                        record.name, record.digest
                    ),
                )
            })?)
        } else {
            None
        };
        let mut status = ReplicaStatus {
            replica_id: start.replica_id.clone(),
            cluster: self.cluster.clone(),
            deployment: deployment.to_string(),
            generation,
            phase: ReplicaPhase::Starting.into(),
            model: record.name.clone(),
            region: self.region.clone(),
            runtime: start.runtime,
            gpus: start.gpu.as_ref().map_or(0, |g| g.count),
            updated_at_unix_ms: now_unix_ms(),
            message: if in_node_cache.is_some() {
                "starting; its pods fetch the model".into()
            } else {
                "fetching the model".into()
            },
            ..Default::default()
        };
        {
            let _transition = self.transitions.lock().await;
            if cancel.is_cancelled() || self.take_stopped_early(&start.replica_id) {
                tracing::info!("stopped before it started; not started");
                return Ok(());
            }
            let recorded = self
                .record_starting(
                    &status,
                    start.replaces_updated_at_unix_ms,
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
            if !recorded {
                tracing::info!(
                    replaces = start.replaces_updated_at_unix_ms,
                    "the replica ended since this start was sent; not started again"
                );
                return Ok(());
            }
        }
        let gpu = start.gpu.clone().unwrap_or_default();
        self.holds.hold(&start.replica_id, gpu.count);
        let model_dir = if let Some(relative) = in_node_cache {
            self.cache.dir().join(relative)
        } else {
            let fetched = tokio::select! {
                fetched = self.cache.fetch(&self.store, &record, shutdown, |_| {}) => fetched,
                () = cancel.cancelled() => return self.abandon(&start.replica_id).await,
            };
            let fetched = match fetched {
                Ok(f) => f,
                Err(e) if e.is_transient() => {
                    // Held again when it is tried again.
                    self.holds.release(&start.replica_id);
                    return Err(HandlerError::retry(e));
                }
                Err(e) => {
                    let _transition = self.transitions.lock().await;
                    self.holds.release(&start.replica_id);
                    if cancel.is_cancelled() {
                        return Ok(());
                    }
                    status.phase = ReplicaPhase::Failed.into();
                    status.message = e.to_string();
                    return self
                        .record(status, EventType::ReplicaFailed, e.to_string(), correlation)
                        .await
                        .map_err(HandlerError::retry);
                }
            };
            fetched.path
        };
        // A one-file model (its parts are pieces of that file) is served as
        // the file; a model of several files as its folder.
        let files: std::collections::BTreeSet<&str> =
            record.parts.iter().map(|p| p.file.as_str()).collect();
        let model_path = match files.into_iter().collect::<Vec<_>>().as_slice() {
            [one] => model_dir.join(one),
            _ => model_dir.clone(),
        };
        let model_in_cache = model_path
            .strip_prefix(self.cache.dir())
            .map(std::path::Path::to_path_buf)
            .unwrap_or_else(|_| model_path.clone());
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
            gpu_products: Vec::new(),
            model_digest: record.digest.clone(),
            engine: start.engine.clone().unwrap_or_default(),
            drift_policy: start.drift_policy(),
        };
        let started = tokio::select! {
            started = self.backend.start(&spec) => started,
            () = cancel.cancelled() => return self.abandon(&start.replica_id).await,
        };
        let _transition = self.transitions.lock().await;
        if cancel.is_cancelled() {
            // Stopped while it came up: the stop waits for this to return
            // and stops it.
            return Ok(());
        }
        match started {
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
                self.holds.release(&start.replica_id);
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

    /// A start a stop cancelled: whatever it brought up goes (the stop
    /// stops it again, which is harmless), and the stop records it.
    async fn abandon(&self, replica_id: &str) -> Result<(), HandlerError> {
        tracing::info!("start cancelled by a stop");
        if let Err(e) = self.backend.stop(replica_id).await {
            tracing::warn!("stopping the cancelled start: {e}");
        }
        self.holds.release(replica_id);
        Ok(())
    }

    fn claim_start(&self, replica_id: &str, deployment: &str, command_id: &str) -> Claim<'_> {
        let mut set = sync::lock(&self.starting);
        if let Some(held) = set.get(replica_id) {
            return if held.command_id == command_id {
                Claim::Same
            } else {
                Claim::Busy(held.done.clone())
            };
        }
        let claim = StartClaim {
            deployment: deployment.to_string(),
            command_id: command_id.to_string(),
            cancel: CancellationToken::new(),
            done: CancellationToken::new(),
        };
        set.insert(replica_id.to_string(), claim.clone());
        Claim::Mine(StartingGuard {
            set: &self.starting,
            replica_id: replica_id.to_string(),
            claim,
        })
    }

    /// Whether a stop for `replica_id` came before this start; forgets it.
    fn take_stopped_early(&self, replica_id: &str) -> bool {
        let mut early = sync::lock(&self.stopped_early);
        early.retain(|_, at| at.elapsed() < STOPPED_EARLY_FOR);
        early.remove(replica_id).is_some()
    }

    /// Cancels the replica's start in progress, if any, and waits until
    /// it let go; whether there was one.
    async fn cancel_start(&self, replica_id: &str) -> bool {
        let claim = sync::lock(&self.starting).get(replica_id).cloned();
        match claim {
            Some(claim) => {
                claim.cancel.cancel();
                claim.done.cancelled().await;
                true
            }
            None => false,
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
        self.cancel_start(&stop.replica_id).await;
        let mut transition = self.transitions.lock().await;
        let Some((mut status, _)) = self.replicas.get(&key).await.map_err(HandlerError::retry)?
        else {
            // Its start has not been handled yet (the two were consumed
            // together and this one went first), or its start was
            // cancelled before it recorded anything: it never runs.
            sync::lock(&self.stopped_early).insert(stop.replica_id.clone(), Instant::now());
            let status = ReplicaStatus {
                replica_id: stop.replica_id.clone(),
                cluster: self.cluster.clone(),
                deployment: deployment.to_string(),
                generation,
                phase: ReplicaPhase::Stopped.into(),
                region: self.region.clone(),
                message: format!("stopped before it started: {}", stop.reason),
                updated_at_unix_ms: now_unix_ms(),
                ..Default::default()
            };
            return self
                .record(
                    status,
                    EventType::ReplicaStopped,
                    format!(
                        "replica {} of {deployment} stopped before it started",
                        stop.replica_id
                    ),
                    correlation,
                )
                .await
                .map_err(HandlerError::retry);
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
        let drains = !self.drain.timeout.is_zero()
            && matches!(status.phase(), ReplicaPhase::Ready | ReplicaPhase::Stopping);
        if drains {
            if status.phase() == ReplicaPhase::Ready {
                // Out of routing first: the gateways route only to ready
                // replicas.
                status.phase = ReplicaPhase::Stopping.into();
                status.message = format!(
                    "draining: finishing its requests (at most {})",
                    humantime::format_duration(self.drain.timeout)
                );
                status.updated_at_unix_ms = now_unix_ms();
                self.record(
                    status.clone(),
                    EventType::ReplicaDraining,
                    format!(
                        "replica {} of {deployment} is draining: out of routing, finishing its requests",
                        stop.replica_id
                    ),
                    correlation,
                )
                .await
                .map_err(HandlerError::retry)?;
            }
            // Other commands go on while it drains.
            drop(transition);
            tokio::time::sleep(self.drain.routing_grace).await;
            let started = Instant::now();
            self.backend
                .drain_and_stop(&stop.replica_id, self.drain.timeout)
                .await
                .map_err(HandlerError::retry)?;
            tracing::info!(replica = %stop.replica_id, drained = ?started.elapsed(), "drained");
            transition = self.transitions.lock().await;
            match self.replicas.get(&key).await.map_err(HandlerError::retry)? {
                Some((current, _)) if current.phase() != ReplicaPhase::Stopped => status = current,
                // Recorded stopped meanwhile (the stop delivered again).
                _ => return Ok(()),
            }
        } else {
            self.backend
                .stop(&stop.replica_id)
                .await
                .map_err(HandlerError::retry)?;
        }
        self.holds.release(&stop.replica_id);
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
        drop(transition);
        // Its last replica here gone (a delete): forget its generation, so
        // the same name applied again, which starts over at generation 1,
        // is not fenced off.
        let starting_here = sync::lock(&self.starting)
            .values()
            .any(|c| c.deployment == deployment);
        let still_live = starting_here
            || self.own_records().await.map_or(true, |records| {
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
        let _transition = self.transitions.lock().await;
        self.holds.release(replica_id);
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
        for progress in seen.progress {
            self.report_progress(progress).await;
        }
        for drift in seen.drifted {
            self.report_drift(drift).await;
        }
    }

    /// A starting replica got on (or is held up): its record's message
    /// says so, and a `replica.progress` event.
    async fn report_progress(&self, progress: Progress) {
        let Progress {
            replica_id,
            reason,
            message,
        } = progress;
        let said = if message.is_empty() {
            reason.clone()
        } else {
            format!("{reason}: {message}")
        };
        let updated = self
            .replicas
            .update(&self.key(&replica_id), |current| {
                let mut status = current?.clone();
                if status.phase() != ReplicaPhase::Starting {
                    return None;
                }
                status.message.clone_from(&said);
                status.updated_at_unix_ms = now_unix_ms();
                Some(status)
            })
            .await;
        let status = match updated {
            Ok(Some(status)) => status,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(replica = %replica_id, "recording progress: {e}");
                return;
            }
        };
        tracing::info!(replica = %replica_id, %reason, "{message}");
        let draft = EventDraft::new(
            EventType::ReplicaProgress,
            &replica_id,
            format!("replica {replica_id} starting: {said}"),
        )
        .generation(status.generation)
        .payload(Payload::Replica(status));
        if let Err(e) = self.bus.publish_event(draft).await {
            tracing::warn!(replica = %replica_id, "publishing progress: {e}");
        }
    }

    /// A replica's objects were changed or deleted by hand: a
    /// `replica.drifted` event naming the differences and what was done.
    async fn report_drift(&self, drift: Drift) {
        let Drift {
            replica_id,
            differences,
            restored,
        } = drift;
        let done = match &restored {
            Ok(true) => "restored (drift policy take-over)".to_string(),
            Ok(false) => "left as it is (drift policy report-only)".to_string(),
            Err(e) => format!("restoring it failed: {e}"),
        };
        tracing::warn!(replica = %replica_id, ?differences, "changed by hand; {done}");
        let status = match self.replicas.get(&self.key(&replica_id)).await {
            Ok(Some((status, _))) => status,
            _ => ReplicaStatus {
                replica_id: replica_id.clone(),
                cluster: self.cluster.clone(),
                ..Default::default()
            },
        };
        let draft = EventDraft::new(
            EventType::ReplicaDrifted,
            &replica_id,
            format!(
                "replica {replica_id} changed by hand ({}); {done}",
                differences.join("; ")
            ),
        )
        .generation(status.generation)
        .payload(Payload::Replica(status));
        if let Err(e) = self.bus.publish_event(draft).await {
            tracing::warn!(replica = %replica_id, "publishing drift: {e}");
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
    max_concurrent_starts: usize,
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
    // A bus that is briefly away (a server of three lost, a stream leader
    // elected) fails a start fast several times in a row; with a long cap
    // the start then waited up to half a minute after the bus was back.
    // Retries stay short and keep trying for about as long as before
    // (ten minutes: a model still being pushed).
    spec.max_backoff = COMMAND_MAX_BACKOFF;
    spec.max_deliveries = 120;
    // A long start or fetch stays claimed by progress acks (every third of
    // this); the command of a killed executor goes to its successor after
    // at most this long.
    spec.ack_wait = crate::COMMAND_ACK_WAIT;
    // Each command in hand has its own progress acks and is acknowledged
    // when its own handler returns.
    spec.max_in_flight = max_concurrent_starts.max(1);
    // A start delivered again is harmless by itself: one for a replica
    // that runs confirms it, one for a replica ended since is stale (see
    // `record_starting`). A stop is recorded: delivered again after a
    // later start of its replica, it would stop that one.
    spec.unrecorded_subjects = vec![bus.subjects.command(&cluster, CommandAction::Start)?];
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
