//! The `placement` service: where each deployment's replicas go, and why.
//!
//! It is the only writer of KV `deployments` and `placements`. The
//! decisions are pure: [`spec::validate`] checks a document field by field,
//! [`scheduler::place`] maps (deployment, fleet, GPUs held by others,
//! current placement) to a placement with a reason for every cluster left
//! out, and [`affected::affected_by_fleet_change`] maps (fleet before, fleet
//! now, placements, deployments) to the deployments to re-plan. This module
//! is the shell and the only one that touches the bus: it reads apply and
//! delete requests, keeps a watched copy of KV `clusters`, asks which
//! deployments a fleet change affects, re-plans them (one `replan` span
//! each, with the deployment, its spec generation and the trigger), writes
//! the results and publishes `deployment.*` events.
//!
//! Start reading at [`run`], then `Planner::replan_for_fleet_change` in
//! `planner.rs`.

pub mod admit;
pub mod affected;
pub mod autoscale;
pub mod fleet;
mod planner;
pub mod scheduler;
pub use flotilla_deployment_spec as spec;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_kit::{
    Bus, BusArgs, BusConfig, ConfigError, ConsumerSpec, Delivery, HandlerError, Health, KitError,
    RecordStore, spawn_consumer,
};
use flotilla_proto::ControlSubject;
use flotilla_proto::v1::{self, ClusterRecord, ModelDeployment, PlacementDecision};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::planner::{APPLY_BATCH, Apply, Planner, Request};
use crate::scheduler::Settings;

pub const SERVICE: &str = "placement";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-placement",
    version,
    about = "Flotilla placement: where each deployment's replicas go"
)]
pub struct Args {
    #[command(flatten)]
    pub bus: BusArgs,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:9102")]
    pub http_addr: SocketAddr,

    /// Score points a cluster a deployment already runs on keeps over
    /// challengers (0–100): replicas move only for a clearly better cluster.
    #[arg(long, env = "FLOTILLA_PLACEMENT_STICKINESS", default_value_t = 20.0)]
    pub stickiness: f64,

    /// A cluster back from unhealthy gets no new replicas for this long.
    #[arg(long, env = "FLOTILLA_FLAP_PROBATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub flap_probation: Duration,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_kit::logging::LogFormat::Text)]
    pub log_format: flotilla_kit::logging::LogFormat,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusConfig,
    pub http_addr: SocketAddr,
    pub settings: Settings,
    pub flap_probation_ms: i64,
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if !(0.0..=100.0).contains(&self.stickiness) {
            return Err(ConfigError::new("placement-stickiness", "must be 0 to 100"));
        }
        Ok(Config {
            bus: self.bus.validate()?,
            http_addr: self.http_addr,
            settings: Settings {
                stickiness: self.stickiness,
                ..Settings::default()
            },
            flap_probation_ms: i64::try_from(self.flap_probation.as_millis())
                .map_err(|_| ConfigError::new("flap-probation", "is too long"))?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error(transparent)]
    Kit(#[from] KitError),
}

/// Why one deployment's new placement was not fully recorded; the next
/// change or tick plans it again.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("writing the placement of {deployment}: {source}")]
    Record {
        deployment: String,
        #[source]
        source: KitError,
    },
    #[error("announcing the placement of {deployment}: {source}")]
    Announce {
        deployment: String,
        #[source]
        source: KitError,
    },
    #[error("recording the phase of {deployment}: {source}")]
    Phase {
        deployment: String,
        #[source]
        source: KitError,
    },
}

/// Runs the service until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), PlacementError> {
    let bus = Bus::connect(&config.bus, SERVICE, &shutdown).await?;
    flotilla_kit::provision(&bus).await?;
    let health = Health::for_bus(&bus);
    health.serve(config.http_addr, shutdown.clone()).await?;

    let clusters = RecordStore::<ClusterRecord>::open(&bus, &bus.topology.clusters.name).await?;
    let deployments =
        RecordStore::<ModelDeployment>::open(&bus, &bus.topology.deployments.name).await?;
    let placements =
        RecordStore::<PlacementDecision>::open(&bus, &bus.topology.placements.name).await?;
    for store_watch in [
        clusters.start_watch(shutdown.clone()).await,
        deployments.start_watch(shutdown.clone()).await,
        placements.start_watch(shutdown.clone()).await,
    ] {
        store_watch?;
    }
    let mut planner = Planner::new(
        bus.clone(),
        (clusters, deployments, placements),
        config.settings,
        config.flap_probation_ms,
    );

    let (tx, rx) = mpsc::channel::<Request>(64);
    let apply = spawn_consumer(
        &bus,
        ConsumerSpec {
            // Handled together, so a queue of applies is written in few
            // round trips; each carries its stream sequence, so one that
            // overtakes an older apply of the same deployment is not
            // undone by it.
            max_in_flight: APPLY_BATCH,
            ..ConsumerSpec::new(
                &bus.topology.control.name,
                "placement-apply",
                vec![bus.subjects.control(ControlSubject::DeploymentApply)],
            )
        },
        tx.clone(),
        |tx, d: Delivery<ModelDeployment>| async move {
            let correlation = d.msg_id.clone().unwrap_or_default();
            ask_planner(&tx, |reply| {
                Request::Apply(Box::new(Apply {
                    doc: d.message,
                    correlation,
                    sequence: d.stream_sequence,
                    reply,
                }))
            })
            .await
        },
        shutdown.clone(),
    );
    let delete = spawn_consumer(
        &bus,
        ConsumerSpec::new(
            &bus.topology.control.name,
            "placement-delete",
            vec![bus.subjects.control(ControlSubject::DeploymentDelete)],
        ),
        tx.clone(),
        |tx, d: Delivery<v1::DeleteDeployment>| async move {
            let id = if d.message.request_id.is_empty() {
                d.msg_id.clone().unwrap_or_default()
            } else {
                d.message.request_id.clone()
            };
            ask_planner(&tx, |reply| Request::Delete(d.message.name, id, reply)).await
        },
        shutdown.clone(),
    );
    // Previews hold the planner's queue weakly: when the apply and delete
    // consumers end, the planner must see its queue close and placement
    // stop, rather than live on answering previews only.
    let preview = tokio::spawn(serve_previews(
        bus.clone(),
        tx.downgrade(),
        shutdown.clone(),
    ));
    drop(tx);

    health.set_ready(true);
    tracing::info!("placement running");
    planner.run(rx, shutdown.clone()).await;
    for task in [apply, delete] {
        if let Ok(Err(e)) = task.await {
            tracing::error!("consumer failed: {e}");
        }
    }
    if let Ok(Err(e)) = preview.await {
        tracing::error!("previews: {e}");
    }
    health.set_ready(false);
    if let Err(e) = bus.client.drain().await {
        tracing::warn!("draining the NATS connection: {e}");
    }
    Ok(())
}

/// Answers `apply --dry-run=server`: core NATS requests on
/// [`Subjects::preview_deployments`](flotilla_proto::Subjects::preview_deployments),
/// one queue group over every instance. A request that cannot be read is
/// answered with `bus.message_rejected`, never dropped.
async fn serve_previews(
    bus: Bus,
    planner: mpsc::WeakSender<Request>,
    shutdown: CancellationToken,
) -> Result<(), KitError> {
    let subject = bus.subjects.preview_deployments();
    let mut requests = bus
        .client
        .queue_subscribe(subject.clone(), SERVICE.to_string())
        .await
        .map_err(|source| KitError::Subscribe {
            subject: subject.clone(),
            source,
        })?;
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            msg = requests.next() => match msg {
                Some(msg) => msg,
                None => return Ok(()),
            },
        };
        let Some(reply_to) = msg.reply.clone() else {
            tracing::warn!(%subject, "a preview request without a reply subject: nobody to answer");
            continue;
        };
        let content_type = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(flotilla_proto::codec::CONTENT_TYPE))
            .map(|v| v.as_str().to_string());
        let event = match flotilla_proto::codec::decode::<ModelDeployment>(
            content_type.as_deref(),
            &msg.payload,
        ) {
            Ok(doc) => {
                let (reply, answer) = oneshot::channel();
                let Some(tx) = planner.upgrade() else {
                    return Ok(());
                };
                if tx
                    .send(Request::Preview(Box::new(doc), reply))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                drop(tx);
                match answer.await {
                    Ok(event) => event,
                    Err(_) => return Ok(()),
                }
            }
            Err(e) => v1::Event {
                time_unix_ms: flotilla_kit::now_unix_ms(),
                source: SERVICE.into(),
                r#type: flotilla_proto::EventType::BusMessageRejected.to_string(),
                severity: v1::Severity::Warning.into(),
                message: format!("preview refused: {e}"),
                payload: Some(v1::event::Payload::Error(v1::ErrorDetail {
                    code: e.code.into(),
                    subject: subject.clone(),
                    field: e.field.clone().unwrap_or_default(),
                    reason: e.reason.clone(),
                    ..Default::default()
                })),
                ..Default::default()
            },
        };
        let body = flotilla_proto::codec::encode(&event, flotilla_proto::codec::Encoding::Protobuf);
        if let Err(e) = bus.client.publish(reply_to, body).await {
            tracing::warn!("answering a preview: {e}");
        }
    }
}

/// Hands a request to the planner task, which handles one at a time, and
/// waits for its answer; a stopped planner is a retry (another instance,
/// or this one restarted, takes the message).
async fn ask_planner(
    tx: &mpsc::Sender<Request>,
    request: impl FnOnce(oneshot::Sender<Result<(), HandlerError>>) -> Request,
) -> Result<(), HandlerError> {
    let (reply, answer) = oneshot::channel();
    tx.send(request(reply))
        .await
        .map_err(|_| HandlerError::retry("planner stopped"))?;
    answer
        .await
        .map_err(|_| HandlerError::retry("planner stopped"))?
}
