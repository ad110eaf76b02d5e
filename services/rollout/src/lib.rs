//! The `rollout` service: makes the replicas that exist match the newest
//! placement of every deployment, by sending start and stop commands to the
//! executors (`<prefix>.cmd.<cluster>.start|stop`).
//!
//! Replicas belong to a *template* (the spec's model, runtime and
//! resources). A placement that only moves or adds replicas keeps every
//! replica it still wants; a new template is rolled out by the spec's
//! strategy: RollingUpdate (`maxSurge`, default 25 % rounded up;
//! `maxUnavailable`, default 0) or Staged (stages of clusters chosen by
//! labels, each rolled with the same limits, then a wait and/or an
//! approval; clusters no stage selects form a last stage, `rest`). Lost
//! capacity is replaced at once on any cluster, gates or not. A first
//! rollout (nothing running to protect) and an undo skip the gates.
//!
//! The decisions are pure: [`plan::plan`] chooses the commands within the
//! strategy's limits, [`advance::advance`] is one step of the stage
//! machine, [`announce::announcements`] the events between two states.
//! This module is the shell around them: it reads the watched caches,
//! calls the step, stores its state by compare-and-set, announces it, and
//! sends its commands, in that order, retrying a deployment whose step
//! failed with backoff.
//!
//! Progress lives in KV `rollouts`, so a restarted instance continues where
//! the last one stopped; commands and events have ids fixed by that state,
//! so nothing is sent twice within the streams' dedup windows, and
//! executors ignore a start of a replica they run. A state is stored
//! before any event announcing it, so whoever reads KV `rollouts` after an
//! event sees that state or a newer one.
//!
//! Failures of the new template's replicas are counted once each; at
//! `--halt-after-failures` the rollout halts: it stops starting and
//! retrying, and keeps the old replicas. `rollout undo` re-applies the spec
//! the rollout replaced.

pub mod advance;
pub mod announce;
mod commands;
mod control;
mod outbox;
pub mod plan;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use flotilla_kit::{
    Backoff, BoxError, Bus, BusArgs, BusConfig, ConfigError, ConsumerSpec, Delivery, Health,
    KitError, RecordStore, now_unix_ms, spawn_consumer,
};
use flotilla_proto::v1::{
    self, ClusterHealth, ClusterRecord, ModelDeployment, PlacementDecision, ReplicaPhase,
    ReplicaStatus, RolloutPhase, RolloutState,
};
use flotilla_proto::{ControlSubject, EventType};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use crate::advance::{
    Advance, Observed, REST_STAGE, Settings, StagePlan, advance, resolve_stages, template_of_spec,
};

pub const SERVICE: &str = "rollout";
const APPROVE_CONSUMER: &str = "rollout-approve";
const UNDO_CONSUMER: &str = "rollout-undo";
/// Between tries of a deployment whose step failed.
const RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-rollout",
    version,
    about = "Flotilla rollout: placements into executor commands"
)]
pub struct Args {
    #[command(flatten)]
    pub bus: BusArgs,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:9104")]
    pub http_addr: SocketAddr,

    /// Failures of a new template's replicas (each failed start counted
    /// once) that halt its rollout.
    #[arg(long, env = "FLOTILLA_HALT_AFTER_FAILURES", default_value_t = 3)]
    pub halt_after_failures: u32,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_kit::logging::LogFormat::Text)]
    pub log_format: flotilla_kit::logging::LogFormat,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusConfig,
    pub http_addr: SocketAddr,
    pub halt_after_failures: u32,
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if self.halt_after_failures == 0 {
            return Err(ConfigError::new(
                "--halt-after-failures",
                "must be at least 1",
            ));
        }
        Ok(Config {
            bus: self.bus.validate()?,
            http_addr: self.http_addr,
            halt_after_failures: self.halt_after_failures,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("opening the events stream {stream} failed")]
    EventsStream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::GetStreamError,
    },
}

/// Why one deployment's step failed; it is tried again after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("reading the rollout events of {deployment} failed")]
    ReadEvents {
        deployment: String,
        #[source]
        source: BoxError,
    },
    #[error("storing the rollout state of {deployment} failed")]
    Store {
        deployment: String,
        #[source]
        source: KitError,
    },
    #[error("announcing {event} of {deployment} failed")]
    Announce {
        deployment: String,
        event: EventType,
        #[source]
        source: KitError,
    },
    #[error("sending {action} of replica {replica} to cluster {cluster} failed")]
    Send {
        action: &'static str,
        replica: String,
        cluster: String,
        #[source]
        source: KitError,
    },
}

#[derive(Clone)]
struct Rollouts {
    bus: Bus,
    placements: RecordStore<PlacementDecision>,
    replicas: RecordStore<ReplicaStatus>,
    clusters: RecordStore<ClusterRecord>,
    deployments: RecordStore<ModelDeployment>,
    rollouts: RecordStore<RolloutState>,
    events: Stream,
    settings: Settings,
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RolloutError> {
    let bus = Bus::connect(&config.bus, SERVICE, &shutdown).await?;
    flotilla_kit::provision(&bus).await?;
    let health = Health::for_bus(&bus);
    health.serve(config.http_addr, shutdown.clone()).await?;
    let t = &bus.topology;
    let events = bus
        .jetstream
        .get_stream(&t.events.name)
        .await
        .map_err(|source| RolloutError::EventsStream {
            stream: t.events.name.clone(),
            source,
        })?;
    let r = Rollouts {
        placements: RecordStore::open(&bus, &t.placements.name).await?,
        replicas: RecordStore::open(&bus, &t.replicas.name).await?,
        clusters: RecordStore::open(&bus, &t.clusters.name).await?,
        deployments: RecordStore::open(&bus, &t.deployments.name).await?,
        rollouts: RecordStore::open(&bus, &t.rollouts.name).await?,
        events,
        settings: Settings {
            halt_after_failures: config.halt_after_failures,
        },
        bus: bus.clone(),
    };
    r.placements.start_watch(shutdown.clone()).await?;
    r.replicas.start_watch(shutdown.clone()).await?;
    r.clusters.start_watch(shutdown.clone()).await?;
    r.deployments.start_watch(shutdown.clone()).await?;
    r.rollouts.start_watch(shutdown.clone()).await?;

    let approve = spawn_consumer(
        &bus,
        ConsumerSpec::control(&bus, APPROVE_CONSUMER, ControlSubject::RolloutApprove),
        r.clone(),
        |r: Rollouts, d: Delivery<v1::ApproveRollout>| async move { r.on_approve(d).await },
        shutdown.clone(),
    );
    let undo = spawn_consumer(
        &bus,
        ConsumerSpec::control(&bus, UNDO_CONSUMER, ControlSubject::RolloutUndo),
        r.clone(),
        |r: Rollouts, d: Delivery<v1::UndoRollout>| async move { r.on_undo(d).await },
        shutdown.clone(),
    );

    let mut placement_changes = r.placements.changes();
    let mut deployment_changes = r.deployments.changes();
    let mut replica_changes = r.replicas.changes();
    let mut rollout_changes = r.rollouts.changes();
    let mut cluster_changes = r.clusters.changes();
    // Waits between stages end on this tick.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut memory = Memory::default();
    health.set_ready(true);
    tracing::info!(
        halt_after_failures = config.halt_after_failures,
        "rollout running"
    );
    let mut due = Due::All;
    let mut last_full_pass = Instant::now();
    loop {
        if last_full_pass.elapsed() >= FULL_PASS_EVERY {
            due = Due::All;
        }
        if due == Due::All {
            last_full_pass = Instant::now();
        }
        r.reconcile(&mut memory, std::mem::replace(&mut due, Due::none()))
            .await;
        let retry = memory.next_retry();
        // What woke the loop, then everything else already queued, so a
        // burst of changes costs one round.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            key = placement_changes.recv() => due.by_name(key),
            key = deployment_changes.recv() => due.by_name(key),
            key = rollout_changes.recv() => due.by_name(key),
            key = replica_changes.recv() => r.replica_changed(&mut due, key),
            // A round compares the fleet with the last one it saw.
            _ = cluster_changes.recv() => {}
            _ = tick.tick() => r.timed(&mut due),
            _ = sleep_until(retry) => {}
        }
        while let Ok(key) = placement_changes.try_recv() {
            due.by_name(Ok(key));
        }
        while let Ok(key) = deployment_changes.try_recv() {
            due.by_name(Ok(key));
        }
        while let Ok(key) = rollout_changes.try_recv() {
            due.by_name(Ok(key));
        }
        loop {
            match replica_changes.try_recv() {
                Ok(key) => r.replica_changed(&mut due, Ok(key)),
                Err(TryRecvError::Lagged(n)) => {
                    r.replica_changed(&mut due, Err(RecvError::Lagged(n)));
                }
                Err(_) => break,
            }
        }
        while cluster_changes.try_recv().is_ok() {}
        memory.retries_due(&mut due, Instant::now());
    }
    health.set_ready(false);
    for task in [approve, undo] {
        match task.await {
            Ok(Err(e)) => tracing::error!("consumer failed: {e}"),
            Err(e) => tracing::error!("consumer panicked: {e}"),
            Ok(Ok(())) => {}
        }
    }
    let _ = bus.client.drain().await;
    Ok(())
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Every deployment is stepped at least this often, whether or not
/// anything about it changed.
const FULL_PASS_EVERY: Duration = Duration::from_secs(30);

/// A command this instance published is not published again for this
/// long. Within the streams' two-minute dedup window, so a resend is
/// dropped by the server unless the first copy was lost with it.
const RESEND_AFTER: Duration = Duration::from_secs(60);

/// The deployments a round steps: those something happened to since the
/// last, not the whole fleet on every replica change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Due {
    All,
    Some(BTreeSet<String>),
}

impl Due {
    fn none() -> Self {
        Self::Some(BTreeSet::new())
    }

    fn add(&mut self, name: String) {
        if let Self::Some(names) = self {
            names.insert(name);
        }
    }

    /// A change of the record named after its deployment; one the
    /// listener missed (it lagged) makes every deployment due.
    fn by_name(&mut self, key: Result<String, RecvError>) {
        match key {
            Ok(name) => self.add(name),
            Err(_) => *self = Self::All,
        }
    }

    fn includes(&self, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::Some(names) => names.contains(name),
        }
    }
}

/// What the reconcile loop carries from one round to the next.
#[derive(Default)]
struct Memory {
    /// Per deployment, the last stored state whose events are all
    /// published (`None`: no state yet), as far as this instance knows;
    /// absent until it has looked.
    announced: HashMap<String, Option<RolloutState>>,
    /// Deployments whose last step failed: how often, and when to try again.
    retries: HashMap<String, (u32, Instant)>,
    /// Command ids this instance published, and when.
    sent: HashMap<String, Instant>,
    /// The live clusters and their labels the last round planned with: a
    /// change makes every deployment due.
    fleet: Option<(BTreeSet<String>, ClusterLabels)>,
}

impl Memory {
    /// Makes the deployments whose backoff is over due.
    fn retries_due(&self, due: &mut Due, now: Instant) {
        for (name, (_, at)) in &self.retries {
            if *at <= now {
                due.add(name.clone());
            }
        }
    }

    fn due(&self, name: &str, now: Instant) -> bool {
        self.retries.get(name).is_none_or(|(_, at)| *at <= now)
    }

    /// Records a failed step; returns the try it was and the wait before
    /// the next.
    fn failed(&mut self, name: &str, now: Instant) -> (u32, Duration) {
        let attempt = self
            .retries
            .get(name)
            .map_or(1, |(a, _)| a.saturating_add(1));
        let wait = RETRY.delay(attempt);
        self.retries.insert(name.to_string(), (attempt, now + wait));
        (attempt, wait)
    }

    fn next_retry(&self) -> Option<Instant> {
        self.retries.values().map(|(_, at)| *at).min()
    }
}

/// Every cluster's name and labels.
type ClusterLabels = Vec<(String, BTreeMap<String, String>)>;

/// One round's reading of the caches every deployment's step shares.
struct View {
    live: BTreeSet<String>,
    clusters: ClusterLabels,
    replicas: BTreeMap<String, Vec<ReplicaStatus>>,
}

impl View {
    fn replicas_of(&self, deployment: &str) -> &[ReplicaStatus] {
        self.replicas.get(deployment).map_or(&[], Vec::as_slice)
    }
}

/// An error and its sources, each said once.
fn chain(e: &dyn std::error::Error) -> String {
    let mut said = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        let text = source.to_string();
        if !said.contains(&text) {
            said.push_str(": ");
            said.push_str(&text);
        }
        next = source.source();
    }
    said
}

impl Rollouts {
    /// A replica record changed: its deployment is due.
    fn replica_changed(&self, due: &mut Due, key: Result<String, RecvError>) {
        match key.map(|k| self.replicas.cached(&k)) {
            Ok(Some(replica)) => due.add(replica.deployment),
            // Deleted, or missed: whose it was is not known here.
            Ok(None) | Err(_) => *due = Due::All,
        }
    }

    /// Deployments whose rollout is under way: a wait between stages ends
    /// with time alone.
    fn timed(&self, due: &mut Due) {
        self.rollouts.scan(|all| {
            for (name, state) in all {
                if !matches!(state.phase(), RolloutPhase::Complete | RolloutPhase::Halted) {
                    due.add(name.to_string());
                }
            }
        });
    }

    fn view(&self, due: &Due) -> View {
        // Scanned, not cloned: a cluster record carries every GPU, and a
        // round runs on every replica change.
        let (live, clusters) = self.clusters.scan(|all| {
            let mut live = BTreeSet::new();
            let mut clusters = ClusterLabels::new();
            for (n, c) in all {
                if matches!(c.health(), ClusterHealth::Healthy | ClusterHealth::Degraded) {
                    live.insert(n.to_string());
                }
                let labels = c
                    .inventory
                    .as_ref()
                    .map(|i| {
                        i.labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                clusters.push((n.to_string(), labels));
            }
            // By name: the store's order is a hash map's, and rounds are
            // compared to tell whether the fleet changed.
            clusters.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            (live, clusters)
        });
        let mut replicas: BTreeMap<String, Vec<ReplicaStatus>> = BTreeMap::new();
        for (_, r) in self.replicas.select(|_, r| due.includes(&r.deployment)) {
            replicas.entry(r.deployment.clone()).or_default().push(r);
        }
        View {
            live,
            clusters,
            replicas,
        }
    }

    async fn reconcile(&self, memory: &mut Memory, mut due: Due) {
        let mut view = self.view(&due);
        // Compared in place: copied only when it changed, not every round.
        let same_fleet = memory
            .fleet
            .as_ref()
            .is_some_and(|(live, clusters)| *live == view.live && *clusters == view.clusters);
        if !same_fleet {
            // Live clusters or labels changed: stages and lost capacity
            // may differ for anyone.
            memory.fleet = Some((view.live.clone(), view.clusters.clone()));
            if due != Due::All {
                due = Due::All;
                view = self.view(&due);
            }
        }
        let names: BTreeSet<String> = match &due {
            Due::All => {
                let mut names: BTreeSet<String> = self
                    .placements
                    .cached_all()
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect();
                names.extend(view.replicas.keys().cloned());
                // A stored state may still owe its events after its
                // deployment is gone.
                names.extend(self.rollouts.cached_all().into_iter().map(|(n, _)| n));
                let now = Instant::now();
                memory
                    .sent
                    .retain(|_, at| now.duration_since(*at) < RESEND_AFTER);
                names
            }
            Due::Some(names) => names.clone(),
        };
        let now = Instant::now();
        for name in names {
            if !memory.due(&name, now) {
                continue;
            }
            let span = tracing::info_span!(
                "rollout_step",
                deployment = %name,
                generation = tracing::field::Empty,
                spec_generation = tracing::field::Empty,
            );
            let result = self
                .step(&name, &view, &mut memory.announced, &mut memory.sent)
                .instrument(span.clone())
                .await;
            match result {
                Ok(()) => {
                    memory.retries.remove(&name);
                }
                Err(e) => {
                    let (attempt, wait) = memory.failed(&name, now);
                    span.in_scope(|| {
                        tracing::warn!(attempt, retry_in = ?wait, "rollout step failed: {}", chain(&e));
                    });
                }
            }
        }
    }

    /// One deployment's step: announce what the stored state still owes,
    /// decide, store, announce, send.
    async fn step(
        &self,
        name: &str,
        view: &View,
        announced: &mut HashMap<String, Option<RolloutState>>,
        sent: &mut HashMap<String, Instant>,
    ) -> Result<(), StepError> {
        let stored = self.rollouts.cached(name);
        self.announce(name, stored.as_ref(), announced).await?;
        let replicas = view.replicas_of(name);
        let deployment = self.deployments.cached(name);
        let spec_generation = deployment
            .as_ref()
            .and_then(|d| d.status.as_ref())
            .map_or(0, |s| s.generation);
        let span = tracing::Span::current();
        span.record("spec_generation", spec_generation);
        let Some(spec) = deployment.and_then(|d| d.spec) else {
            let retire = advance::retire(name, replicas, &view.live);
            span.record("generation", retire.generation);
            let retired = retire.steps.is_empty()
                && replicas.iter().all(|r| r.phase() == ReplicaPhase::Stopped);
            self.send(name, retire.generation, None, retire.steps, sent)
                .await?;
            // Its rollout history ends with it: applied again under the
            // same name, it is a new deployment whose undo cannot reach
            // into the old one's specs.
            if let Some(stored) = stored.filter(|_| retired) {
                let gone = self
                    .rollouts
                    .delete_if(name, |s| *s == stored)
                    .await
                    .map_err(|source| StepError::Store {
                        deployment: name.to_string(),
                        source,
                    })?;
                if gone {
                    announced.remove(name);
                }
            }
            return Ok(());
        };
        let Some(placement) = self.placements.cached(name) else {
            return Ok(());
        };
        if !advance::placed_for(&placement, spec_generation) {
            return Ok(());
        }
        // Placement's generation, as in every command and replica status.
        span.record("generation", placement.generation);
        let observed = Observed {
            deployment: name,
            spec: &spec,
            spec_generation,
            placement: &placement,
            replicas,
            live: &view.live,
            clusters: &view.clusters,
        };
        let next = advance(stored.as_ref(), &observed, now_unix_ms(), &self.settings);
        if stored.as_ref() != Some(&next.state) {
            let written = self
                .rollouts
                .update(name, |current| {
                    (current == stored.as_ref()).then(|| next.state.clone())
                })
                .await
                .map_err(|source| StepError::Store {
                    deployment: name.to_string(),
                    source,
                })?;
            let Some(written) = written else {
                // Another instance moved it first; the next round starts
                // from what it wrote.
                return Ok(());
            };
            self.announce(name, Some(&written), announced).await?;
        }
        self.send(
            name,
            placement.generation,
            Some((&spec, &placement)),
            next.steps,
            sent,
        )
        .await
    }
}

/// A phase as `flotilla rollout status` prints it.
pub fn phase_name(phase: RolloutPhase) -> &'static str {
    match phase {
        RolloutPhase::Unspecified => "unknown",
        RolloutPhase::Progressing => "Progressing",
        RolloutPhase::Waiting => "Waiting",
        RolloutPhase::AwaitingApproval => "AwaitingApproval",
        RolloutPhase::Halted => "Halted",
        RolloutPhase::Complete => "Complete",
    }
}
