//! The `inventory` service: what the fleet has, cluster by cluster.
//!
//! It is the only writer of KV `clusters`. It reads executor heartbeats
//! (`<prefix>.telemetry.<cluster>`) and cordon requests, keeps each
//! cluster's record (labels, taints, GPUs, cost, cached models, health),
//! and publishes one `cluster.*` event per transition: joined, healthy,
//! degraded, unhealthy, left, cordoned, uncordoned.
//!
//! The decisions are pure functions in [`lifecycle`]; this module feeds them
//! from the bus and writes their results. Several instances may run: each
//! hears every heartbeat (a consumer of its own) and remembers when it last
//! heard each cluster, records are written with compare-and-set so only
//! one write makes a transition, and the event of a transition has a fixed
//! id so it is stored once whoever publishes it. A heartbeat that changes
//! nothing but liveness and gauges is not written until the record is
//! [`RECORD_REFRESH`] old: at a thousand clusters that is most of the
//! bucket's writes.
//!
//! Start reading at [`run`].

pub mod detector;
pub mod lifecycle;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_kit::{
    Bus, BusArgs, BusConfig, ConfigError, ConsumerSpec, Delivery, EventDraft, HandlerError, Health,
    KitError, OwnConsumer, RecordStore, now_unix_ms, spawn_consumer,
};
use flotilla_proto::v1::{self, ClusterRecord, event::Payload};
use flotilla_proto::{ControlSubject, EventType, check_name};
use tokio_util::sync::CancellationToken;

pub use lifecycle::HealthPolicy;

pub const SERVICE: &str = "inventory";
/// A cluster's record is rewritten at least this often while it sends
/// heartbeats, for readers of `last_seen` (`flotilla get clusters`); what
/// else a heartbeat changes is written at once.
pub const RECORD_REFRESH: Duration = Duration::from_secs(5);
/// An instance's heartbeat consumer outlives it by this long on the server.
const OWN_CONSUMER_IDLE: Duration = Duration::from_secs(60);
const TELEMETRY_CONSUMER: &str = "inventory-telemetry";
const CORDON_CONSUMER: &str = "inventory-cordon";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-inventory",
    version,
    about = "Flotilla inventory: cluster health and capacity from executor heartbeats"
)]
pub struct Args {
    #[command(flatten)]
    pub bus: BusArgs,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:9101")]
    pub http_addr: SocketAddr,

    /// A cluster without a heartbeat this long is unhealthy.
    #[arg(long, env = "FLOTILLA_UNHEALTHY_AFTER", default_value = "3s", value_parser = humantime::parse_duration)]
    pub unhealthy_after: Duration,

    /// An unhealthy cluster without a heartbeat this long has left.
    #[arg(long, env = "FLOTILLA_LEFT_AFTER", default_value = "10m", value_parser = humantime::parse_duration)]
    pub left_after: Duration,

    /// Heartbeats whose clock differs from ours by more are rejected.
    #[arg(long, env = "FLOTILLA_MAX_CLOCK_SKEW", default_value = "30s", value_parser = humantime::parse_duration)]
    pub max_clock_skew: Duration,

    /// How often silences are checked.
    #[arg(long, env = "FLOTILLA_HEALTH_CHECK_INTERVAL", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub check_interval: Duration,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_kit::logging::LogFormat::Text)]
    pub log_format: flotilla_kit::logging::LogFormat,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusConfig,
    pub http_addr: SocketAddr,
    pub policy: HealthPolicy,
    pub check_interval: Duration,
}

fn millis(flag: &'static str, d: Duration) -> Result<i64, ConfigError> {
    let ms = i64::try_from(d.as_millis()).map_err(|_| ConfigError::new(flag, "is too long"))?;
    if ms <= 0 {
        return Err(ConfigError::new(flag, "must be longer than 0"));
    }
    Ok(ms)
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let policy = HealthPolicy {
            unhealthy_after_ms: millis("unhealthy-after", self.unhealthy_after)?,
            left_after_ms: millis("left-after", self.left_after)?,
            max_clock_skew_ms: millis("max-clock-skew", self.max_clock_skew)?,
        };
        if policy.left_after_ms <= policy.unhealthy_after_ms {
            return Err(ConfigError::new(
                "left-after",
                "must be longer than --unhealthy-after",
            ));
        }
        millis("check-interval", self.check_interval)?;
        Ok(Config {
            bus: self.bus.validate()?,
            http_addr: self.http_addr,
            policy,
            check_interval: self.check_interval,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(transparent)]
    Kit(#[from] KitError),
}

#[derive(Clone)]
struct Inventory {
    bus: Bus,
    clusters: RecordStore<ClusterRecord>,
    policy: HealthPolicy,
    /// The newest heartbeat this instance received from each cluster.
    heard: Arc<Mutex<HashMap<String, Heard>>>,
    /// The hub's pulse: a watch fed by every heartbeat received.
    pulse: Arc<Mutex<detector::HubWatch>>,
}

#[derive(Debug, Clone)]
struct Heard {
    at_ms: i64,
    executor_instance: String,
    sequence: u64,
}

/// Runs the service until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), InventoryError> {
    let bus = Bus::connect(&config.bus, SERVICE, &shutdown).await?;
    flotilla_kit::provision(&bus).await?;
    let health = Health::for_bus(&bus);
    health.serve(config.http_addr, shutdown.clone()).await?;

    let clusters = RecordStore::<ClusterRecord>::open(&bus, &bus.topology.clusters.name).await?;
    clusters.start_watch(shutdown.clone()).await?;
    let inventory = Inventory {
        bus: bus.clone(),
        clusters,
        policy: config.policy,
        heard: Arc::default(),
        pulse: Arc::new(Mutex::new(detector::HubWatch::new(
            detector::HubWatch::gap_for(&config.policy),
        ))),
    };

    let mut telemetry = ConsumerSpec::new(
        &bus.topology.telemetry.name,
        TELEMETRY_CONSUMER,
        vec![bus.subjects.telemetry_all()],
    );
    // Every instance hears every heartbeat: liveness is kept in memory.
    // Those sent while it started count (a slow start on a busy machine
    // included), up to half the clock skew: older ones would be refused.
    let replay =
        Duration::from_millis(u64::try_from(config.policy.max_clock_skew_ms / 2).unwrap_or(0));
    telemetry.own_instance = Some(OwnConsumer {
        replay,
        idle: OWN_CONSUMER_IDLE,
    });
    // Heartbeats are idempotent (sequence-checked) and frequent: skip the
    // handled ledger, and don't retry one for long, a newer one follows.
    telemetry.remember_handled = false;
    telemetry.max_deliveries = 3;
    telemetry.initial_backoff = Duration::from_millis(100);
    // Heartbeats of different clusters are independent and a stale one is
    // ignored by its sequence, so they may be handled side by side.
    telemetry.max_in_flight = 64;
    telemetry.confirm_acks = false;
    let cordon = ConsumerSpec::control(&bus, CORDON_CONSUMER, ControlSubject::ClusterCordon);

    let telemetry_task = spawn_consumer(
        &bus,
        telemetry,
        inventory.clone(),
        |inv: Inventory, d| async move { inv.on_heartbeat(d).await },
        shutdown.clone(),
    );
    let cordon_task = spawn_consumer(
        &bus,
        cordon,
        inventory.clone(),
        |inv: Inventory, d| async move { inv.on_cordon(d).await },
        shutdown.clone(),
    );
    let ticker_task = {
        let inv = inventory.clone();
        let stop = shutdown.clone();
        let interval = config.check_interval;
        tokio::spawn(async move { inv.check_silences(interval, stop).await })
    };

    health.set_ready(true);
    tracing::info!(
        unhealthy_after_ms = config.policy.unhealthy_after_ms,
        left_after_ms = config.policy.left_after_ms,
        "inventory running"
    );
    for task in [telemetry_task, cordon_task, ticker_task] {
        match task.await {
            Ok(Err(e)) => tracing::error!("task failed: {e}"),
            Err(e) => tracing::error!("task panicked: {e}"),
            Ok(Ok(())) => {}
        }
    }
    health.set_ready(false);
    if let Err(e) = inventory.bus.client.drain().await {
        tracing::warn!("draining the NATS connection: {e}");
    }
    Ok(())
}

impl Inventory {
    async fn on_heartbeat(&self, d: Delivery<v1::ClusterHeartbeat>) -> Result<(), HandlerError> {
        let subject_cluster = self
            .bus
            .subjects
            .cluster_of_telemetry(&d.subject)
            .unwrap_or_default();
        // Without a valid cluster name there is no cluster to report on:
        // the kit's rejection event names the subject instead.
        check_name("cluster", subject_cluster)
            .map_err(|e| HandlerError::invalid("cluster", e.to_string()))?;
        let hb = d.message;
        let now = now_unix_ms();
        if let Err(bad) = lifecycle::validate(&hb, subject_cluster, now, &self.policy) {
            tracing::warn!(cluster = subject_cluster, field = %bad.field, "heartbeat rejected: {}", bad.reason);
            let detail = v1::ErrorDetail {
                code: "invalid_heartbeat".into(),
                subject: d.subject.clone(),
                field: bad.field.clone(),
                reason: bad.reason.clone(),
                stream_sequence: d.stream_sequence,
                consumer: TELEMETRY_CONSUMER.into(),
            };
            let draft = EventDraft::new(
                EventType::ClusterHeartbeatRejected,
                subject_cluster,
                format!("heartbeat of {subject_cluster} rejected: {bad}"),
            )
            .payload(Payload::Error(detail))
            .id(format!(
                "heartbeat-rejected-{subject_cluster}-{}",
                d.stream_sequence
            ));
            return self
                .bus
                .publish_event(draft)
                .await
                .map_err(HandlerError::retry);
        }
        if !self.hear(&hb, now) {
            return Ok(());
        }
        let refresh_ms = RECORD_REFRESH.as_millis() as i64;
        let written = self
            .clusters
            .update(&hb.cluster, |current| {
                lifecycle::on_heartbeat_coalesced(current, &hb, now, refresh_ms)
            })
            .await
            .map_err(HandlerError::retry)?;
        if let Some(record) = written {
            self.announce(record).await.map_err(HandlerError::retry)?;
        }
        Ok(())
    }

    /// Remembers a heartbeat as heard; `false` for one of the same
    /// executor instance no newer than the last (a redelivery).
    fn hear(&self, hb: &v1::ClusterHeartbeat, now_ms: i64) -> bool {
        let mut heard = flotilla_kit::sync::lock(&self.heard);
        if let Some(h) = heard.get(&hb.cluster)
            && h.executor_instance == hb.executor_instance
            && hb.sequence <= h.sequence
        {
            return false;
        }
        heard.insert(
            hb.cluster.clone(),
            Heard {
                at_ms: now_ms,
                executor_instance: hb.executor_instance.clone(),
                sequence: hb.sequence,
            },
        );
        flotilla_kit::sync::lock(&self.pulse).observe(true, now_ms, now_ms);
        true
    }

    /// When this instance last heard from each cluster.
    fn last_heard(&self) -> HashMap<String, i64> {
        flotilla_kit::sync::lock(&self.heard)
            .iter()
            .map(|(name, h)| (name.clone(), h.at_ms))
            .collect()
    }

    async fn on_cordon(&self, d: Delivery<v1::CordonCluster>) -> Result<(), HandlerError> {
        let request = d.message;
        check_name("cluster", &request.cluster)
            .map_err(|e| HandlerError::invalid("cluster", e.to_string()))?;
        if self
            .clusters
            .get(&request.cluster)
            .await
            .map_err(HandlerError::retry)?
            .is_none()
        {
            return Err(HandlerError::invalid(
                "cluster",
                format!(
                    "no cluster named {:?} has joined the fleet",
                    request.cluster
                ),
            ));
        }
        let written = self
            .clusters
            .update(&request.cluster, |current| {
                current.and_then(|c| lifecycle::on_cordon(c, request.cordon, &request.reason))
            })
            .await
            .map_err(HandlerError::retry)?;
        match written {
            Some(record) => {
                tracing::info!(cluster = %request.cluster, cordoned = request.cordon, "cordon changed");
                self.announce(record).await.map_err(HandlerError::retry)
            }
            None => Ok(()),
        }
    }

    /// Publishes the event a record owes, then marks it published. The
    /// event id is fixed per (cluster, generation): two instances, or a
    /// retry after a crash, store it once.
    async fn announce(&self, record: ClusterRecord) -> Result<(), KitError> {
        let Some(ty) = lifecycle::pending_event(&record) else {
            return Ok(());
        };
        let generation = record.generation;
        tracing::info!(cluster = %record.name, generation, "{ty}: {}", record.last_transition_message);
        let draft = EventDraft::new(ty, &record.name, record.last_transition_message.clone())
            .generation(generation)
            .id(format!("cluster-{}-g{generation}", record.name))
            .payload(Payload::Cluster(record.clone()));
        self.bus.publish_event(draft).await?;
        self.clusters
            .update(&record.name, |current| {
                let c = current?;
                (c.announced_generation < generation && c.generation >= generation).then(|| {
                    let mut next = c.clone();
                    next.announced_generation = generation;
                    next
                })
            })
            .await?;
        Ok(())
    }

    /// Turns silences into unhealthy and left, and publishes any event a
    /// crashed instance left owing. Each check first proves the bus
    /// answers (a round trip); silences are judged only against the time
    /// the hub itself watched, and a silence of the whole fleet is held
    /// (see [`detector`]).
    async fn check_silences(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> Result<(), KitError> {
        let gap_ms = detector::HubWatch::gap_for(&self.policy);
        let round_trip_timeout = Duration::from_millis(u64::try_from(gap_ms).unwrap_or(1));
        let mut watch = detector::HubWatch::new(gap_ms);
        let mut holding: Option<detector::Hold> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = ticker.tick() => {}
            }
            let sent = now_unix_ms();
            let answered = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.bus.round_trip(round_trip_timeout) => r,
            };
            let now = now_unix_ms();
            watch.observe(answered.is_ok(), sent, now);
            let heard = self.last_heard();
            let pulse = flotilla_kit::sync::lock(&self.pulse).watching_since(now);
            let judgement = self.clusters.scan(|all| {
                detector::judge(
                    all,
                    &heard,
                    watch.watching_since(now),
                    pulse,
                    now,
                    &self.policy,
                )
            });
            let since = judgement.since_ms;
            if judgement.held != holding {
                match (&judgement.held, &answered) {
                    (Some(hold), Err(e)) => tracing::warn!("{hold} ({e})"),
                    (Some(hold), Ok(_)) => tracing::warn!("{hold}"),
                    (None, _) => tracing::info!("judging cluster silences again"),
                }
                holding = judgement.held;
            }
            for name in judgement.due {
                let Some(since) = since else { break };
                let result = match self
                    .clusters
                    .update(&name, |c| {
                        let since = heard.get(&name).map_or(since, |at| since.max(*at));
                        c.and_then(|c| lifecycle::on_tick(c, now, since, &self.policy))
                    })
                    .await
                {
                    Ok(Some(written)) => self.announce(written).await,
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    tracing::warn!(cluster = %name, "health check: {e}");
                }
            }
            let owing = self
                .clusters
                .select(|_, r| lifecycle::pending_event(r).is_some());
            for (name, record) in owing {
                if let Err(e) = self.announce(record).await {
                    tracing::warn!(cluster = %name, "publishing an owed event: {e}");
                }
            }
        }
    }
}
