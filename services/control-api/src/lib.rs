//! The `control-api`: the fleet over gRPC (`flotilla.v1.ControlApi`) for
//! clients that do not speak NATS: everything the `flotilla` command line
//! does.
//!
//! Changes take the bus path a `flotilla` command takes: a deployment is
//! checked with placement's own validation (a refused field is
//! `INVALID_ARGUMENT` naming it), published on the same control subject
//! with a request id, and answered by the event the owning service
//! correlates with it (placement for deployments, rollout for approve and
//! undo, inventory for cordons); previews and log tails are NATS requests
//! to placement and to the replica's executor. Reads come from the KV
//! buckets; `ListEvents` and `Watch` read the events stream, from now, a
//! time or a sequence, optionally for one kind and name. It decides
//! nothing itself.

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_kit::{Bus, BusArgs, BusConfig, ConfigError, Health, KitError, RecordStore};
use tokio_util::sync::CancellationToken;

mod service;
pub use service::Control;

/// The generated API: its own messages and the service; the messages it
/// carries (`ModelDeployment`, `Event`, ...) are `flotilla_proto`'s.
pub mod api {
    #![allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]
    tonic::include_proto!("flotilla.v1");

    /// The `FileDescriptorSet` of the API and the files it imports, as
    /// gRPC reflection serves it (`grpcurl list`, `grpcurl describe`).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/control_api_descriptors.binpb"));
}

use api::control_api_server::ControlApiServer;

pub const SERVICE: &str = "control-api";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-control-api",
    version,
    about = "Flotilla control API: the fleet over gRPC"
)]
pub struct Args {
    #[command(flatten)]
    pub bus: BusArgs,

    /// Address of the gRPC API.
    #[arg(
        long,
        env = "FLOTILLA_CONTROL_API_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:9105")]
    pub http_addr: SocketAddr,

    /// How long Apply and Delete wait for placement's answer.
    #[arg(long, env = "FLOTILLA_ANSWER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub answer_timeout: Duration,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_kit::logging::LogFormat::Text)]
    pub log_format: flotilla_kit::logging::LogFormat,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusConfig,
    pub listen: SocketAddr,
    pub http_addr: SocketAddr,
    pub answer_timeout: Duration,
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if self.answer_timeout.is_zero() {
            return Err(ConfigError::new("answer-timeout", "must be more than 0"));
        }
        Ok(Config {
            bus: self.bus.validate()?,
            listen: self.listen,
            http_addr: self.http_addr,
            answer_timeout: self.answer_timeout,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlApiError {
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
}

/// Serves until `shutdown`; `bound` gets the gRPC address.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), ControlApiError> {
    let bus = Bus::connect(&config.bus, SERVICE, &shutdown).await?;
    flotilla_kit::provision(&bus).await?;
    let health = Health::for_bus(&bus);
    health.serve(config.http_addr, shutdown.clone()).await?;
    let t = bus.topology.clone();
    let control = Control {
        deployments: RecordStore::open(&bus, &t.deployments.name).await?,
        placements: RecordStore::open(&bus, &t.placements.name).await?,
        rollouts: RecordStore::open(&bus, &t.rollouts.name).await?,
        clusters: RecordStore::open(&bus, &t.clusters.name).await?,
        replicas: RecordStore::open(&bus, &t.replicas.name).await?,
        models: RecordStore::open(&bus, &t.models.name).await?,
        bus,
        answer_timeout: config.answer_timeout,
    };
    let client = control.bus.client.clone();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ControlApiError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| ControlApiError::Bind {
            addr: config.listen,
            source,
        })?;
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    tracing::info!(%local, "control API serving gRPC");
    health.set_ready(true);
    // Standard gRPC health (`grpc.health.v1`, what Kubernetes' grpc probe
    // and grpc_health_probe ask) and reflection, so grpcurl needs no
    // .proto files.
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ControlApiServer<Control>>()
        .await;
    let described = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = described()
        .build_v1()
        .map_err(|e| ControlApiError::Reflection(e.to_string()))?;
    // Older grpcurl and Postman builds ask the v1alpha service.
    let reflection_v1alpha = described()
        .build_v1alpha()
        .map_err(|e| ControlApiError::Reflection(e.to_string()))?;
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(ControlApiServer::new(control))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await;
    health.set_ready(false);
    if let Err(e) = client.drain().await {
        tracing::warn!("draining the NATS connection: {e}");
    }
    served.map_err(Into::into)
}
